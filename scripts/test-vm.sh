#!/usr/bin/env bash
# The VM suite (as root): the installed daemon end to end in Debian 13 (trixie) and Debian 12
# (bookworm) guests under qemu.  See README "VM suite" and tests/vm/run.py.
#   scripts/test-vm.sh                    both guests
#   scripts/test-vm.sh --guest trixie     one guest
#   scripts/test-vm.sh --with-pending     also the tests waiting for other fixes (DH_VM_PENDING=1)
#   scripts/test-vm.sh --only ports       only tests whose name contains "ports" (repeatable)
#   scripts/test-vm.sh --clean            remove the image cache (/var/cache/dindhelper-vm)
# Installs its host tools itself (qemu-system-x86 from bookworm-backports through a private
# apt config, mmdebstrap, ...); builds release binaries; ends with `N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${DH_VM_CACHE:-/var/cache/dindhelper-vm}
[ "$(id -u)" = 0 ] || { echo "scripts/test-vm.sh: run as root (mmdebstrap, qemu images)"; exit 1; }
if [ "${1:-}" = --clean ]; then
  rm -rf "$CACHE"
  echo "removed $CACHE"
  exit 0
fi
# host tools; a failure here fails the suite (never a skip)
if ! tests/vm/build-image.sh --tools; then
  echo "test vm/host-tools ... FAILED"
  echo "0 passed, 1 failed"
  exit 1
fi
cargo build --release --locked --bins
exec python3 tests/vm/run.py "$@"
