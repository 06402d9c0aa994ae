#!/usr/bin/env bash
# Installs what sdn-tunnel's demo and tests need on a Debian bookworm machine
# (as root): the lab's packages and the kube-apiserver built from Debian's
# source (cached under ~/.cache/sdn-tunnel; a second run is instant).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (apt-get, network namespaces)" >&2; exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: no cargo on PATH: install Rust >= 1.89 with rustup (https://rustup.rs) first" >&2; exit 1
fi
bash "$here/tests/lab/build-apiserver.sh" >/dev/null
# `wg` (wireguard-tools) and Debian's wireguard-go: the UAPI and interop test
# of `tunnel-agent wg` (agent/daemon/tests/standalone_wg.rs).
if ! command -v wg >/dev/null 2>&1 || ! command -v wireguard-go >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wireguard-tools wireguard-go >/dev/null
fi
# The installer and its checks: Debian's ansible (ships the kubernetes.core
# collection) with python3-kubernetes for ansible/site.yml and its e2e
# (tests/e2e/tests/ansible.rs); shellcheck for `make lint`.
if ! command -v ansible-playbook >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1 \
    || ! dpkg -s python3-kubernetes >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ansible python3-kubernetes shellcheck >/dev/null
fi
# The kubelet lab (LabConfig::real_nodes, `make e2e-kubelet`, `make
# demo-kubelet`) and `make image`: containerd, runc and the CNI plugins on
# every lab node; buildah (vfs, no registry), binutils (objcopy), a C
# compiler with static libc (the pause image) and busybox for the images.
kubelet_lab_pkgs=(containerd runc containernetworking-plugins buildah busybox-static binutils gcc libc6-dev)
missing=()
for p in "${kubelet_lab_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "install-deps: lab prerequisites and kube-apiserver ready" >&2
