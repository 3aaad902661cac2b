#!/usr/bin/env bash
# Run the whole test suite on a fresh machine (as root): install what the tests use, then
# unit tests, kernel tests and the integration binary (real dbus-daemon, polkitd, users,
# loop devices, dockerd in a network namespace), then the clean-root demo check and the VM
# suite (`--host-only` runs the first part only).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "scripts/test.sh: run as root (real loop devices, polkit users)"; exit 1; }
PKGS=(dbus polkitd fdisk util-linux e2fsprogs libxml2-utils docker.io iptables nftables ipset
      tcpdump busybox-static systemd-container strace libpcap-dev curl iproute2 procps
      libglib2.0-bin make systemd python3-dbus-fast mmdebstrap)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# The installable system files are well-formed (the policy also against polkit's DTD).
make check-files
# The cgroupfs instance backend makes a `dind` parent group in each hierarchy; remove the
# empty parents afterwards when they were not there before (leave the machine as found).
had_dind=$(ls -d /sys/fs/cgroup/*/dind /sys/fs/cgroup/dind 2>/dev/null || true)
cleanup() {
  for d in /sys/fs/cgroup/*/dind /sys/fs/cgroup/dind; do
    [ -d "$d" ] || continue
    case "$had_dind" in *"$d"*) continue ;; esac
    rmdir "$d" 2>/dev/null || true
  done
}
trap cleanup EXIT
# Kernel and integration tests share loop devices, users and polkit files: one at a time.
cargo test --all-targets -- --test-threads=1
# `--host-only`: stop here (a quick loop while developing). The whole suite goes on with the
# README's two commands in a clean Debian 12 root, and the modern hosts: Debian 13 and 12
# guests under qemu with the installed daemon (each installs its own tools), the in-guest
# instances bench printed.
[ "${1:-}" = "--host-only" ] && exit 0
tests/cleanroot/run.sh
DH_VM_BENCH=${DH_VM_BENCH:-1} DH_VM_BENCH_N=${DH_VM_BENCH_N:-10} scripts/test-vm.sh
