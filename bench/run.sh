#!/usr/bin/env bash
# The data-path benchmark (not a test): builds what it runs, installs the
# reference implementations it can, and runs target/release/sdn-bench.
#   bench/run.sh            3 rounds x 10 s per measurement
#   bench/run.sh --quick    1 round x 2 s (CI smoke run)
#   bench/run.sh --runs 5 --secs 20 --only veth,boringtun-cli,ours-runtime
# Needs root (network namespaces, TUN). Prints figures; never judges them.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [ "$(id -u)" != 0 ]; then
    echo "bench: run as root (network namespaces, TUN devices)" >&2; exit 1
fi
missing=()
for pair in iperf3:iperf3 sockperf:sockperf wg:wireguard-tools wireguard-go:wireguard-go ping:iputils-ping; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: apt-get install ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null
fi
cargo build --release -p sdn-tunnel-agent -p sdn-tunnel-bench
tools=target/bench-tools
for crate in boringtun-cli:boringtun-cli gotatun-cli:gotatun; do
    if [ ! -x "$tools/bin/${crate#*:}" ]; then
        cargo install --locked --root "$tools" "${crate%%:*}" \
            || echo "bench: NOTE: cargo install ${crate%%:*} failed; that row will be skipped" >&2
    fi
done
exec target/release/sdn-bench --tools-root "$tools" "$@"
