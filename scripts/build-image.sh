#!/usr/bin/env bash
# `make image`: builds sdn-tunnel's image without Docker and without a
# registry, plus the two images the kubelet lab needs beside it, as OCI
# archives that `ctr -n k8s.io images import` takes:
#   localhost/sdn-tunnel:<tag>            tunnel-agent and tunctl in
#       /usr/local/bin, nft, ip and wg with their shared libraries (the
#       same programs the Containerfile's image has; ENTRYPOINT tunnel-agent,
#       CMD run)
#   localhost/sdn-tunnel-lab-pause:1      the pods' sandbox (scripts/pause.c)
#   localhost/sdn-tunnel-lab-tools:<tag>  the lab's test pods: `lab` (serve,
#       request, probe) and busybox (sh, nslookup)
# Images are made with `buildah --storage-driver vfs from scratch` in a
# private storage next to the archives, from this machine's binaries.
#
#   PROFILE=release|debug (default release; debug binaries are stripped of
#       debug info and not rebuilt: the e2e uses what `cargo build` made)
#   TAG (default: the workspace version)
#   SDN_TUNNEL_IMAGES (default ${SDN_TUNNEL_CACHE:-~/.cache/sdn-tunnel}/images)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "build-image: $*" >&2; }
PROFILE=${PROFILE:-release}
TAG=${TAG:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$here/Cargo.toml")}
OUT=${SDN_TUNNEL_IMAGES:-${SDN_TUNNEL_CACHE:-$HOME/.cache/sdn-tunnel}/images}
TARGET=${CARGO_TARGET_DIR:-$here/target}/$PROFILE
for tool in buildah cc objcopy ldd busybox; do
    command -v "$tool" >/dev/null || { log "no $tool: run \`bash scripts/install-deps.sh\`"; exit 1; }
done
if [ "$PROFILE" = release ]; then
    (cd "$here" && cargo build --release --locked -p sdn-tunnel-agent --bin tunnel-agent \
        -p tunctl --bin tunctl -p sdn-tunnel-lab --bin lab >&2)
fi
for b in tunnel-agent tunctl lab; do
    [ -x "$TARGET/$b" ] || { log "no $TARGET/$b: run \`cargo build --workspace --bins\`"; exit 1; }
done

mkdir -p "$OUT"
work=$(mktemp -d "$OUT/.build.XXXXXX")
B=(buildah --storage-driver vfs --root "$OUT/.buildah/root" --runroot "$OUT/.buildah/run")
cleanup() { rm -rf "$work"; }
trap cleanup EXIT

# copy_with_libs ROOT FILE [DEST]: FILE (and every shared library ldd
# names for it, the loader included) into ROOT at the same paths.
copy_with_libs() {
    local root=$1 file=$2 dest=${3:-$2}
    [ "$file" -ef "$root$dest" ] || install -D -m 0755 "$file" "$root$dest"
    ldd "$file" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
}
# our_binary ROOT NAME: a workspace binary without its debug info.
our_binary() {
    local root=$1 name=$2
    mkdir -p "$root/usr/local/bin"
    objcopy --strip-debug "$TARGET/$name" "$root/usr/local/bin/$name"
    copy_with_libs "$root" "$root/usr/local/bin/$name" "/usr/local/bin/$name"
}
base_files() {
    local root=$1
    mkdir -p "$root/etc" "$root/tmp" "$root/var/run" "$root/var/lib/sdn-tunnel"
    chmod 1777 "$root/tmp"
    printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
    printf 'root:x:0:\n' > "$root/etc/group"
    cp /etc/protocols /etc/services "$root/etc/" 2>/dev/null || true
}
# image NAME:TAG ROOT ARCHIVE [buildah config args...]
image() {
    local ref=$1 root=$2 archive=$3; shift 3
    local c
    c=$("${B[@]}" from scratch)
    "${B[@]}" copy "$c" "$root" / >/dev/null
    "${B[@]}" config "$@" "$c"
    "${B[@]}" commit --rm -q "$c" "$ref" >/dev/null
    rm -f "$OUT/$archive.tmp"
    "${B[@]}" push -q "$ref" "oci-archive:$OUT/$archive.tmp:$ref"
    mv "$OUT/$archive.tmp" "$OUT/$archive"
    "${B[@]}" rmi -f "$ref" >/dev/null || true
    log "$ref -> $OUT/$archive ($(du -h "$OUT/$archive" | cut -f1))"
}
env_path=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# sdn-tunnel
r=$work/sdn-tunnel
base_files "$r"
our_binary "$r" tunnel-agent
our_binary "$r" tunctl
copy_with_libs "$r" "$(command -v nft)" /usr/sbin/nft
copy_with_libs "$r" "$(command -v ip)" /usr/sbin/ip
copy_with_libs "$r" "$(command -v wg)" /usr/bin/wg
image "localhost/sdn-tunnel:$TAG" "$r" sdn-tunnel.oci.tar \
    --env "$env_path" --entrypoint '["/usr/local/bin/tunnel-agent"]' --cmd run \
    --label org.opencontainers.image.title=sdn-tunnel \
    --label "org.opencontainers.image.version=$TAG"

# pause
r=$work/pause
mkdir -p "$r"
cc -static -Os -o "$r/pause" "$here/scripts/pause.c"
image localhost/sdn-tunnel-lab-pause:1 "$r" sdn-tunnel-lab-pause.oci.tar \
    --entrypoint '["/pause"]'

# lab tools
r=$work/tools
base_files "$r"
our_binary "$r" lab
install -D -m 0755 "$(command -v busybox)" "$r/bin/busybox"
for a in sh cat ls sleep nslookup env ps grep wget; do ln -s busybox "$r/bin/$a"; done
image "localhost/sdn-tunnel-lab-tools:$TAG" "$r" sdn-tunnel-lab-tools.oci.tar \
    --env "$env_path" --entrypoint '["/usr/local/bin/lab"]'
echo "$OUT"
