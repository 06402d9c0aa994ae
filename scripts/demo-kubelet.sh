#!/usr/bin/env bash
# `make demo-kubelet`: the two-cluster lab with real nodes (containerd,
# kubelet, kube-proxy), sdn-tunnel installed by its playbook, a web pod per
# node, then traffic between the clusters from inside a real pod. Leaves the
# lab running (`make down-kubelet`); kubectl with the kubeconfig it prints.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
lab=$here/target/debug/lab
name=kdemo
started=$(date +%s)
say() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - started ))"; }
"$lab" down --name "$name" >/dev/null
say "lab up: 2 clusters x 2 real nodes"
"$lab" up --name "$name" --underlay-octet 86 --real-nodes | tail -n +2
kc=/tmp/sdn-tunnel-lab/$name/kubeconfig
k() { kubectl --kubeconfig "$kc" "$@"; }
inv=$("$lab" inventory --name "$name" --tunctl "$here/target/debug/tunctl")
say "ansible-playbook site.yml (waits for the DaemonSet and tunnel-dns rollout)"
(cd "$here/ansible" && ANSIBLE_NOCOLOR=1 ansible-playbook -i "$inv" site.yml | tail -n 4)
for c in east west; do k --context "$c" -n sdn-tunnel get pods -o wide; done
ver=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$here/Cargo.toml")
say "a web pod on every node (lab serve, answers its name)"
for c in east west; do
    for n in 1 2; do
        cat <<YAML
apiVersion: v1
kind: Pod
metadata: {name: web-$n, namespace: default, labels: {app: web}}
spec:
  nodeName: $c-node-$n
  containers:
  - {name: web, image: "localhost/sdn-tunnel-lab-tools:$ver", imagePullPolicy: Never, args: [serve, --name, $c-web-$n]}
---
YAML
    done | k --context "$c" apply -f - >/dev/null
    printf 'apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n' \
        | k --context "$c" apply -f - >/dev/null
    k --context "$c" wait --for=condition=Ready pod/web-1 pod/web-2 --timeout=120s >/dev/null
done
say "from east's web-1 (a real pod) to west"
for n in 1 2; do
    ip=$(k --context west get pod "web-$n" -o jsonpath='{.status.podIP}')
    printf 'east web-1 -> west pod %s: ' "$ip"; k --context east exec web-1 -- lab request "$ip:8080"
done
svc=$(k --context west get svc web -o jsonpath='{.spec.clusterIP}')
printf 'east web-1 -> west ClusterIP %s: ' "$svc"; k --context east exec web-1 -- lab request "$svc:80"
say "tunctl peers"
"$here/target/debug/tunctl" --kubeconfig "$kc" --all-contexts peers
printf '\nkubectl --kubeconfig %s --context east|west ...   (make down-kubelet removes it all)\n' "$kc"
