#!/usr/bin/env bash
# Build (or reuse from the cache) everything one VM guest needs: host tools, a Debian kernel,
# a tiny initramfs, and a warmed guest root filesystem.  Prints, as its last line,
#   IMAGE <dir>            (dir holds vmlinuz, initrd.cpio, rootfs.ext4)
#
# usage: tests/vm/build-image.sh trixie|bookworm
#        tests/vm/build-image.sh --tools       (only the host tools)
#
# Cache: one directory, $DH_VM_CACHE (default /var/cache/dindhelper-vm), kept under 3 GiB:
#   apt/                  private apt config + lists (bookworm + bookworm-backports) for host
#                         tools and the kernel package; the machine's /etc/apt is not touched
#   linux-image-<ver>.deb Debian kernel package (apt-get download, never installed), 102 MB
#   linux-image-<ver>/    vmlinuz + initrd.cpio built from it, 17 MB
#   <suite>-<key>/        rootfs.ext4 (sparse, 4 GiB apparent, 0.66-0.71 GB used), warmed once
#                         <key> = sha256 of the suite, its package list, guest/setup.sh and
#                         the kernel version: change any and the image is rebuilt; older
#                         keys of the same suite are deleted.  Both guests: ~1.5 GB.
# `scripts/test-vm.sh --clean` removes the whole directory.
#
# Learned on this machine kind (2 cores shared, TCG; see tests/vm/vm.py for the boot side):
# - qemu-system-x86 must come from bookworm-backports: the machine has qemu-utils 10.0 from
#   backports and bookworm's qemu-system-common 7.2 conflicts with it.
# - Kernel: linux-image-amd64 from bookworm-backports (6.12.x) boots both guests.  virtio_blk
#   and ext4 are modules, so the initramfs insmods their dependency closure (crc32c_generic
#   is needed with -cpu qemu64, which has no SSE4.2 crc32 instruction).
# - Guest packages: Debian's kernel enables AppArmor, so `apparmor` must be in the guest or
#   `docker run` fails loading docker-default; trixie split docker-cli out of docker.io and
#   no longer pulls login/passwd in.
# - mmdebstrap fetches guest packages from the machine's own mirror; the guest suites exist
#   only on mmdebstrap's command line.
# - Measured cold (2 cores, the other agents compiling, load 8-18): trixie 226 s (mmdebstrap
#   105 s, mkfs.ext4 -d 4 s, warm-up boot 112 s), bookworm 467 s (mmdebstrap 322 s, mkfs 11 s,
#   warm-up 126 s), host tools 15 s, kernel download 2 s.  Versions: kernel 6.12.95+deb12,
#   trixie systemd 257 / Docker 26.1.5 / polkitd 126 / glibc 2.41; bookworm systemd 252 /
#   Docker 20.10.24 / polkitd 122 / glibc 2.36.
# - One persistent warm-up boot (AppArmor cache, /var/lib/docker initialised, busybox image
#   imported) after which every test boot uses snapshot=on: the cache is never modified.
set -euo pipefail
HERE=$(dirname "$(readlink -f "$0")")
CACHE=${DH_VM_CACHE:-/var/cache/dindhelper-vm}
ts() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }
log() { echo "build-image: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }

# --- host tools --------------------------------------------------------------------------
A=$CACHE/apt
srcs() { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *//p'; }
MIRROR=${MIRROR:-$(srcs | grep -v security | head -1)}
SECMIRROR=${SECMIRROR:-$(srcs | grep security | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECMIRROR=${SECMIRROR:-http://deb.debian.org/debian-security}
KR=/usr/share/keyrings/debian-archive-keyring.gpg
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/etc/none"
{ echo "deb [signed-by=$KR] $MIRROR bookworm main"
  echo "deb [signed-by=$KR] $MIRROR bookworm-updates main"
  echo "deb [signed-by=$KR] $SECMIRROR bookworm-security main"
  echo "deb [signed-by=$KR] $MIRROR bookworm-backports main"; } >"$A/etc/sources.list"
cat >"$A/apt.conf" <<EOS
Dir::Etc::SourceList "$A/etc/sources.list";
Dir::Etc::SourceParts "$A/etc/none";
Dir::State::Lists "$A/lists";
Dir::Cache "$A/cache";
EOS
export APT_CONFIG=$A/apt.conf DEBIAN_FRONTEND=noninteractive
# apt lists are refreshed at most once a day (a warm run must not wait for the mirror)
if [ -z "$(find "$A/lists" -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  T=$(ts); apt-get update -qq; log "apt-get update (private config): $(el "$T") s"
fi
need=()
for p in mmdebstrap busybox-static cpio kmod e2fsprogs zstd; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v qemu-system-x86_64 >/dev/null; then
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
fi
apt-get clean
command -v qemu-system-x86_64 >/dev/null || { log "qemu-system-x86_64 missing after install"; exit 1; }
[ "${1:-}" = --tools ] && exit 0

SUITE=${1:?usage: build-image.sh trixie|bookworm}
case $SUITE in
  bookworm) EXTRA="" ;;
  trixie) EXTRA="docker-cli login" ;;
  *) log "unknown suite $SUITE"; exit 1 ;;
esac

# --- kernel + initramfs (shared by both guests) ------------------------------------------
KPKG=$(apt-cache depends linux-image-amd64/bookworm-backports 2>/dev/null |
  awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$KPKG" ] || { log "cannot resolve linux-image-amd64 in bookworm-backports"; exit 1; }
KDEB=$CACHE/$KPKG.deb
KDIR=$CACHE/$KPKG
KX=$(mktemp -d "$CACHE/kx.XXXXXX")
cleanup() { rm -rf "$KX" "${WORK:-}" "${OUT:+$OUT.tmp}" "$KDIR.tmp"; }
trap cleanup EXIT
if [ ! -f "$KDEB" ]; then
  T=$(ts)
  (cd "$KX" && apt-get download -q "$KPKG" 2>&1 | grep -v unsandboxed >&2 || true)
  mv "$KX"/"$KPKG"_*.deb "$KDEB"
  for old in "$CACHE"/linux-image-*.deb; do [ "$old" = "$KDEB" ] || rm -f "$old"; done
  log "kernel package $KPKG downloaded: $(el "$T") s"
fi
KVER=${KPKG#linux-image-}
# the kernel tree (~0.5 GB unpacked) only when the initramfs or a root filesystem is built
unpack_kernel() {
  [ -d "$KX/lib/modules/$KVER" ] && return 0
  dpkg-deb -x "$KDEB" "$KX"
  [ -d "$KX/lib/modules/$KVER" ] || { log "$KDEB has no lib/modules/$KVER"; exit 1; }
  /sbin/depmod -b "$KX" "$KVER"
}
if [ ! -f "$KDIR/initrd.cpio" ]; then
  T=$(ts)
  unpack_kernel
  rm -rf "$KDIR"; mkdir -p "$KDIR.tmp"
  cp "$KX/boot/vmlinuz-$KVER" "$KDIR.tmp/vmlinuz"
  python3 "$HERE/mkinitrd.py" "$KX" "$KVER" "$KDIR.tmp/initrd.cpio" \
    virtio_pci virtio_blk virtio_console ext4 crc32c_generic crc32c_intel >&2
  mv "$KDIR.tmp" "$KDIR"
  for old in "$CACHE"/linux-image-*/; do [ "${old%/}" = "$KDIR" ] || rm -rf "$old"; done
  log "kernel + initramfs ($KVER): $(el "$T") s"
fi

# --- root filesystem ---------------------------------------------------------------------
# Everything the suite runs in the guest.  make: `make install` of the project's files;
# passwd/adduser: groupadd/useradd; tcpdump: capture read-back; busybox-static: the container
# image and nc/wget in the test netns.
PKGS="systemd systemd-sysv udev dbus polkitd pkexec docker.io containerd runc iptables
util-linux fdisk kmod e2fsprogs iproute2 procps busybox-static qemu-guest-agent apparmor
make passwd adduser tcpdump libpcap0.8 coreutils sed $EXTRA"
[ "$SUITE" = trixie ] && PKGS=${PKGS/libpcap0.8 /libpcap0.8t64 }
PKGS=$(echo $PKGS | tr ' ' '\n' | sort -u | tr '\n' ' ')
KEY=$( { echo "$SUITE"; echo "$PKGS"; echo "$KVER"; cat "$HERE/guest/setup.sh"; } |
  sha256sum | cut -c1-16)
OUT=$CACHE/$SUITE-$KEY
if [ -f "$OUT/rootfs.ext4" ] && [ -f "$OUT/.warm" ]; then
  log "cached image $OUT"
  echo "IMAGE $OUT"
  exit 0
fi
for old in "$CACHE/$SUITE"-*/; do [ -d "$old" ] && rm -rf "$old"; done
T0=$(ts)
unpack_kernel
WORK=$(mktemp -d "$CACHE/work-$SUITE.XXXXXX")
case $SUITE in bookworm) SEC=bookworm-security ;; trixie) SEC=trixie-security ;; esac
T=$(ts)
mmdebstrap --mode=root --variant=apt --format=directory --quiet \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --include="$(echo $PKGS | tr ' ' ,)" \
  --customize-hook='mkdir -p "$1/usr/lib/modules"' \
  --customize-hook="copy-in $KX/lib/modules/$KVER /usr/lib/modules" \
  --customize-hook="chroot \"\$1\" depmod -a $KVER" \
  --customize-hook="copy-in $HERE/guest/setup.sh /root" \
  --customize-hook='chroot "$1" sh /root/setup.sh' \
  "$SUITE" "$WORK/root" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECMIRROR $SEC main" >&2
log "mmdebstrap $SUITE: $(el "$T") s"
mkdir -p "$OUT.tmp"
T=$(ts)
mkfs.ext4 -q -F -L dhroot -d "$WORK/root" "$OUT.tmp/rootfs.ext4" 4G
log "mkfs.ext4 -d: $(el "$T") s"
rm -rf "$WORK"
cp "$KDIR/vmlinuz" "$KDIR/initrd.cpio" "$OUT.tmp/"
# warm-up boot: writes to the image (no snapshot), then powers off cleanly
T=$(ts)
python3 "$HERE/vm.py" warm "$OUT.tmp" >&2
log "warm-up boot: $(el "$T") s"
touch "$OUT.tmp/.warm"
mv "$OUT.tmp" "$OUT"
log "image $SUITE built in $(el "$T0") s; cache: $(du -sh "$CACHE" | cut -f1)"
echo "IMAGE $OUT"
