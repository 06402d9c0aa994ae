#!/usr/bin/env bash
# Two kind clusters, sdn-tunnel installed by the Ansible playbook, and the
# e2e checks of the lab run against real nodes:
#   east: kube-proxy iptables, pods 10.1.0.0/16, services 10.101.0.0/16
#   west: kube-proxy ipvs,     pods 10.2.0.0/16, services 10.102.0.0/16
# Needs docker, kind, kubectl, ansible-playbook (+ python3-kubernetes) and
# cargo. Run from anywhere:   bash tests/e2e/kind/run.sh
# KEEP=1 leaves the clusters running; SKIP_BUILD=1 reuses the loaded image.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
image=${IMAGE:-localhost/sdn-tunnel:dev}
prefix=${KIND_PREFIX:-sdnt}
east="${prefix}-east"
west="${prefix}-west"
work=$(mktemp -d "${TMPDIR:-/tmp}/sdn-tunnel-kind.XXXXXX")

log() { printf '\n== %s\n' "$*" >&2; }
fail() { printf 'kind e2e: FAILED: %s\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl ansible-playbook cargo; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed"
done

cleanup() {
    local rc=$?
    if [ "${KEEP:-0}" = 1 ]; then
        echo "clusters kept: kind delete cluster --name $east; kind delete cluster --name $west; work dir $work" >&2
    else
        kind delete cluster --name "$east" >/dev/null 2>&1 || true
        kind delete cluster --name "$west" >/dev/null 2>&1 || true
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT

# --- clusters -------------------------------------------------------------
create_cluster() { # name podSubnet serviceSubnet kubeProxyMode
    cat >"$work/$1.kind.yaml" <<YAML
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  podSubnet: "$2"
  serviceSubnet: "$3"
  kubeProxyMode: "$4"
nodes:
- role: control-plane
- role: worker
YAML
    kind create cluster --name "$1" --config "$work/$1.kind.yaml" --wait 180s
    kind get kubeconfig --name "$1" >"$work/$1.kubeconfig"
}
log "creating kind clusters $east (iptables) and $west (ipvs)"
create_cluster "$east" 10.1.0.0/16 10.101.0.0/16 iptables
create_cluster "$west" 10.2.0.0/16 10.102.0.0/16 ipvs

# The other cluster's agents reach an API server at its control-plane
# container's address on the shared `kind` docker network (the host's
# 127.0.0.1:<port> from `kind get kubeconfig` only works from this machine).
api_for_peers() {
    local ip
    ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1-control-plane")
    [ -n "$ip" ] || fail "no docker address for $1-control-plane"
    echo "https://$ip:6443"
}

# --- image and tools --------------------------------------------------------
log "building tunctl and e2e-check"
(cd "$root" && cargo build --bins -p tunctl -p sdn-tunnel-e2e)
tunctl="$root/target/debug/tunctl"
check="$root/target/debug/e2e-check"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    log "building $image"
    ctx="$work/context"
    mkdir -p "$ctx/tests"
    # A small context: the sources, never target/.
    cp "$root"/{Containerfile,Cargo.toml,Cargo.lock,rustfmt.toml,clippy.toml} "$ctx/"
    cp -r "$root/agent" "$root/tunctl" "$ctx/"
    cp -r "$root/tests/lab" "$root/tests/e2e" "$ctx/tests/"
    DOCKER_BUILDKIT=1 docker build -t "$image" -f "$ctx/Containerfile" "$ctx"
fi
kind load docker-image "$image" --name "$east"
kind load docker-image "$image" --name "$west"

# --- inventory and playbook -----------------------------------------------
inventory="$work/inventory.yml"
cat >"$inventory" <<YAML
sdn_tunnel_clusters:
  hosts:
    east:
      kubeconfig: $work/$east.kubeconfig
      context: kind-$east
      pod_cidrs: [10.1.0.0/16]
      service_cidrs: [10.101.0.0/16]
      api_server_for_peers: $(api_for_peers "$east")
    west:
      kubeconfig: $work/$west.kubeconfig
      context: kind-$west
      pod_cidrs: [10.2.0.0/16]
      service_cidrs: [10.102.0.0/16]
      api_server_for_peers: $(api_for_peers "$west")
  vars:
    sdn_tunnel_image: $image
    sdn_tunnel_coredns_stub_domains: true
    sdn_tunnel_wait_rollout: true
    sdn_tunnel_tunctl: $tunctl
YAML

# Runs a playbook and prints the sum of `changed` over its PLAY RECAP.
playbook() { # playbook.yml [args...]
    local out
    out="$work/$1.$(date +%s%N).log"
    (cd "$root/ansible" && ansible-playbook -i "$inventory" "$@") | tee "$out" >&2
    awk '/PLAY RECAP/ {r=1; next} r && / : / {for (i=1; i<=NF; i++) if ($i ~ /^changed=/) {split($i, a, "="); s+=a[2]}} END {print s+0}' "$out"
}

log "site.yml (first run)"
playbook site.yml >/dev/null
log "site.yml (second run: must change nothing)"
changed=$(playbook site.yml)
[ "$changed" = 0 ] || fail "second site.yml run changed $changed things"

# --- the lab's checks, against these clusters ------------------------------
log "objects, RBAC and mesh (the assertions of tests/e2e)"
"$check" --inventory "$inventory" installed
"$check" --inventory "$inventory" rbac
"$check" --inventory "$inventory" --timeout 180 mesh

kc() { # cluster kubectl-args...
    local c=$1
    shift
    kubectl --kubeconfig "$work/$prefix-$c.kubeconfig" "$@"
}

log "workloads: web (agnhost netexec) in both clusters, a client in each"
for c in east west; do
    kc "$c" create namespace demo --dry-run=client -o yaml | kc "$c" apply -f -
    kc "$c" -n demo apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: registry.k8s.io/e2e-test-images/agnhost:2.47
        args: ["netexec", "--http-port=8080", "--udp-port=8080"]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - name: client
    image: docker.io/library/busybox:1.36
    command: ["sleep", "86400"]
YAML
    kc "$c" -n demo rollout status deploy/web --timeout 180s
    kc "$c" -n demo wait --for=condition=Ready pod/client --timeout 180s
done

fetch() { # from-cluster url -> body
    kc "$1" -n demo exec client -- wget -q -T 5 -O - "$2"
}

# fetch, retried for up to two minutes: CoreDNS picks up the stub domains
# the playbook added only at its next `reload` (and the kubelet syncs the
# ConfigMap volume lazily).
fetch_eventually() { # from-cluster url -> body
    local i
    for i in $(seq 24); do
        if fetch "$1" "$2" 2>/dev/null; then
            return 0
        fi
        [ "$i" = 24 ] || sleep 5
    done
    return 1
}

log "pod IP to pod IP, both ways"
for pair in "east west" "west east"; do
    read -r from to <<<"$pair"
    while read -r name ip; do
        got=$(fetch "$from" "http://$ip:8080/hostname") || fail "$from -> $to pod $name ($ip)"
        [ "$got" = "$name" ] || fail "$from -> $to pod $ip answered '$got', not $name"
        echo "ok: $from client -> $to pod $name ($ip)"
    done < <(kc "$to" -n demo get pods -l app=web -o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP}{"\n"}{end}')
done

log "remote ClusterIP, then service names in cluster.<name> and cluster.all"
for pair in "east west" "west east"; do
    read -r from to <<<"$pair"
    pods=$(kc "$to" -n demo get pods -l app=web -o jsonpath='{.items[*].metadata.name}')
    ip=$(kc "$to" -n demo get svc web -o jsonpath='{.spec.clusterIP}')
    for url in "http://$ip/hostname" "http://web.demo.svc.cluster.$to/hostname"; do
        got=$(fetch_eventually "$from" "$url") || fail "$from -> $url"
        case " $pods " in *" $got "*) echo "ok: $from -> $url answered by $to's $got" ;;
            *) fail "$from -> $url answered '$got', not one of $to's pods ($pods)" ;; esac
    done
    addrs=$(kc "$from" -n demo exec client -- nslookup web.demo.svc.cluster.all.) || fail "$from: cluster.all lookup"
    for c in east west; do
        cip=$(kc "$c" -n demo get svc web -o jsonpath='{.spec.clusterIP}')
        grep -q "$cip" <<<"$addrs" || fail "$from: web.demo.svc.cluster.all lacks $c's $cip: $addrs"
    done
    echo "ok: $from resolves web.demo.svc.cluster.all to both clusters"
done

log "tunctl peers --check"
"$tunctl" --kubeconfig "$work/$east.kubeconfig" --context "kind-$east" peers --check
"$tunctl" --kubeconfig "$work/$west.kubeconfig" --context "kind-$west" peers --check

# --- uninstall ----------------------------------------------------------------
# Routes the agents installed on a node (route protocol 93 is theirs).
our_routes() { docker exec "$1" ip route show proto 93; }
for c in "$east" "$west"; do
    for node in $(kind get nodes --name "$c"); do
        [ -n "$(our_routes "$node")" ] || fail "$node has no route of the agents"
        echo "ok: $node routes the remote CIDRs to its agent"
    done
done

log "uninstall.yml"
playbook uninstall.yml >/dev/null
"$check" --inventory "$inventory" uninstalled
for c in "$east" "$west"; do
    for node in $(kind get nodes --name "$c"); do
        # the DaemonSet's pods got SIGTERM and removed their routes
        for _ in $(seq 30); do
            [ -z "$(our_routes "$node")" ] && break
            sleep 1
        done
        [ -z "$(our_routes "$node")" ] || fail "$node still has the agents' routes after uninstall"
        if docker exec "$node" sh -c 'command -v nft' >/dev/null \
            && docker exec "$node" nft list tables | grep -q sdn_tunnel; then
            fail "$node still has the agents' nftables table after uninstall"
        fi
    done
done
changed=$(playbook uninstall.yml)
[ "$changed" = 0 ] || fail "second uninstall.yml run changed $changed things"
log "kind e2e passed"
