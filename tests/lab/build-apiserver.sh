#!/usr/bin/env bash
# Builds kube-apiserver, and the real-node components of the kubelet lab
# (kubelet, kube-proxy, kube-controller-manager, kube-scheduler), in one pass
# from Debian bookworm's `kubernetes` source package, and installs the lab's
# other prerequisites (etcd, openssl, iproute2, ...).
#
# Idempotent and cached by source version: the binaries land in
#   ${SDN_TUNNEL_CACHE:-~/.cache/sdn-tunnel}/kube-apiserver-<debian version>/
# and a second run only prints the apiserver's path. Prints the kube-apiserver
# path on stdout's last line (the others are beside it).
set -euo pipefail

CACHE=${SDN_TUNNEL_CACHE:-$HOME/.cache/sdn-tunnel}
log() { echo "build-apiserver: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (apt-get, network namespaces)"; exit 1
    fi
}

enable_deb_src() {
    # Debian's deb822 sources: add deb-src next to deb for every suite.
    local f=/etc/apt/sources.list.d/debian.sources
    if [ -f "$f" ] && ! grep -q '^Types:.*deb-src' "$f"; then
        log "enabling deb-src in $f"
        sed -i 's/^Types: deb$/Types: deb deb-src/' "$f"
        APT_UPDATED=0
    fi
    if [ -f /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list \
        && ! grep -q '^deb-src ' /etc/apt/sources.list; then
        sed -n 's/^deb /deb-src /p' /etc/apt/sources.list >> /etc/apt/sources.list
        APT_UPDATED=0
    fi
}

APT_UPDATED=0
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq >&2; APT_UPDATED=1; fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

need_root
# Runtime prerequisites of the lab, needed even when the binary is cached.
apt_install etcd-server openssl iproute2 nftables procps psmisc curl ca-certificates iptables

COMPONENTS="kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler"
all_built() {
    local c
    for c in $COMPONENTS; do [ -x "$1/$c" ] || return 1; done
}

VERSION_FILE=$CACHE/.kubernetes-source-version
if [ -f "$VERSION_FILE" ]; then
    ver=$(cat "$VERSION_FILE")
    if all_built "$CACHE/kube-apiserver-$ver"; then
        echo "$CACHE/kube-apiserver-$ver/kube-apiserver"
        exit 0
    fi
fi

enable_deb_src
apt_install golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev make
if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq >&2; APT_UPDATED=1; fi

mkdir -p "$CACHE/src"
cd "$CACHE/src"
ver=$(apt-cache showsrc kubernetes | sed -n 's/^Version: //p' | sort -V | tail -n1)
[ -n "$ver" ] || { log "apt-cache showsrc kubernetes found no version (deb-src enabled?)"; exit 1; }
out=$CACHE/kube-apiserver-$ver
if all_built "$out"; then
    echo "$ver" > "$VERSION_FILE"; echo "$out/kube-apiserver"; exit 0
fi
log "building $COMPONENTS from Debian source kubernetes $ver (about 20 minutes on 2 cores)"
upstream=${ver#*:}; upstream=${upstream%-*}
orig=$(ls kubernetes_"$upstream".orig.tar.* 2>/dev/null | head -n1 || true)
if [ -z "$orig" ]; then
    apt-get source --download-only "kubernetes=$ver" >&2
    orig=$(ls kubernetes_"$upstream".orig.tar.* | head -n1)
fi
work=$CACHE/src/build-$upstream
rm -rf "$work"; mkdir -p "$work"
tar -xf "$orig" -C "$work" --strip-components=1
# The vendored reflect2 1.0.1 crashes (SIGSEGV) on bookworm's Go when decoding
# custom-resource watches; Debian's 1.0.2 works.
# Replace the package wholesale: 1.0.1 has files (go_above_17.go, ...) that
# clash with 1.0.2's.
rm -f "$work"/vendor/github.com/modern-go/reflect2/*.go "$work"/vendor/github.com/modern-go/reflect2/*.s
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
   /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
   "$work/vendor/github.com/modern-go/reflect2/"
what=""
for c in $COMPONENTS; do what="$what cmd/$c"; done
# One make shares the package compile between the five commands.
(cd "$work" && GOPROXY=off GOFLAGS= CGO_ENABLED=0 make WHAT="${what# }" >&2)
mkdir -p "$out"
for c in $COMPONENTS; do
    bin=$(find "$work/_output" -type f -name "$c" -perm -u+x | head -n1)
    [ -n "$bin" ] || { log "build finished but no $c binary found"; exit 1; }
    cp "$bin" "$out/$c.tmp" && mv "$out/$c.tmp" "$out/$c"
done
echo "$ver" > "$VERSION_FILE"
rm -rf "$work"   # 1.3 GB of build tree; the orig tarball stays for a rebuild
log "built $COMPONENTS in $out"
echo "$out/kube-apiserver"
