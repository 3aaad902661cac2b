#!/usr/bin/env bash
# The README's first command in a clean Debian 12 root (as root):
#
#   tests/cleanroot/run.sh            build or reuse the root, run `sudo scripts/demo.sh` and
#                                     `sudo scripts/demo.sh stop` in a fresh copy of it, check
#                                     that nothing is left, remove the copy
#   tests/cleanroot/run.sh --prepare  only build (or find) the cached root
#   tests/cleanroot/run.sh --clean    remove the cache (/var/cache/dindhelper-vm/cleanroot)
#   DH_CLEANROOT_KEEP=1 ...           keep the copy (its path is printed) for a look
#   DH_CLEANROOT_FAULT=skip-stop ...  self-check: no `demo.sh stop`; the run must FAIL and
#                                     still leave nothing (processes killed, cgroups removed)
#
# What "clean" means here, and what is added to it:
# - the root: `mmdebstrap --variant=minbase bookworm` (Essential + Priority required + apt:
#   no curl, no iproute2, no gcc, no ca-certificates) plus `sudo` and a user `student`
#   (uid 1000) who may sudo without a password, as on a machine whose admin runs the README's
#   commands. Cached under /var/cache/dindhelper-vm/cleanroot/bookworm-<hash of the recipe>
#   (184 MB) and reused; every run works on a fresh `cp -a` of it, never on the cache.
#   A copy, not an overlay: the demo's dockerd keeps its data root inside the root, and
#   overlay2 refuses an overlayfs below it (it would fall back to vfs, not what a machine does).
# - /usr/sbin/policy-rc.d (exit 101, in each copy), the usual chroot guard: package scripts
#   that would start services (docker.io, dbus, polkitd) must not start them on the machine.
#   The demo starts its own (a private bus, polkitd, dockerd) and does not need them.
# - the Rust toolchain only: the caller's rustup home (RUSTUP_HOME, else ~/.rustup) and
#   cargo's bin dir (CARGO_HOME/bin, else ~/.cargo/bin) are bind-mounted read-only at
#   /home/student/.rustup and /home/student/.cargo/bin: the layout rustup makes for a user.
#   ~/.cargo/registry starts empty: cargo fetches the crates from crates.io as a new user's
#   first build does (inside the demo's build step, not timed apart).
# - /etc/resolv.conf, /etc/hosts and the local CA files (/usr/local/share/ca-certificates)
#   copied from the machine: its network settings, not packages.
# - the repository: the work tree's files that git tracks or would track (not target/, not
#   ignored files), copied to /home/student/dindhelper, owned by student.
# - downloaded .deb files are kept in the cache (apt-archives/) and bind-mounted at
#   /var/cache/apt/archives: a second run does not download the packages again, but the demo
#   still decides and installs them itself (apt-get update + install run as on a fresh machine).
#
# How it runs: everything below happens in a private mount namespace (unshare --mount
# --propagation private) whose root is the copy (pivot_root: see the inner side for why not a
# chroot), with /proc (new), /sys and /dev (recursive binds: the real kernel's loop devices,
# cgroups and network namespaces) and a tmpfs on /run.
# Not systemd-nspawn: nspawn gives the container its own /dev without loop-control or the
# loopNpM nodes the kernel makes, and its own cgroup namespace, which is what the demo
# exercises; a root on the real /dev and /sys is what "a Debian 12 machine" means here.
# systemd is never booted. The mounts exist only in that namespace: the machine's mount
# table never holds them, and the copy is removed from the machine's namespace after the
# inner side ended (rm --one-file-system, after checking no mount lies below it).
#
# After `demo.sh stop` it checks, and fails (exit 1) when anything is left: a process in the
# namespace or whose root is in the copy, a loop device backed by a file in the copy, a new
# loop device, network namespace, mount or dind/docker cgroup on the machine. Leftover
# processes are then killed (by pid; they are the demo's), the copy is removed all the same.
# Prints the time of each phase; ends with `cleanroot: PASSED` or `cleanroot: FAILED`.
set -Eeuo pipefail
{ # read whole before it runs: an edit of this file during a run does not change the run
HERE=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)
CACHE=${DH_CLEANROOT_CACHE:-/var/cache/dindhelper-vm/cleanroot}
SUITE=bookworm
USERNAME=student
ts() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }
log() { printf '\033[1mcleanroot: %s\033[0m\n' "$*"; }

# ---------------------------------------------------------------------------------------
# Inner side: runs in the private mount namespace (re-executed by the outer side).
if [ "${1:-}" = --inner ]; then
  R=$DH_CR_ROOT
  readlink /proc/self/ns/mnt >"$DH_CR_SCRATCH/mntns"
  exec 3>>"$DH_CR_SCRATCH/phases" # the phase times, written after the scratch dir is gone
  mount --make-rprivate /
  # The copy becomes the root of this mount namespace (pivot_root, as nspawn does), not a
  # chroot directory. Measured with a chroot: `ip -n NS` fails ("mount --make-rslave /":
  # EINVAL, "/" not a mount point), and with a bind mount on it every container's pivot_root
  # lands below the namespace's root, so setns(CLONE_NEWNS) into a container (the daemon's
  # ExposeToContainer) found the outer /dev and refused with Conflict. On a machine neither
  # happens: "/" is the namespace's root mount.
  mount --bind "$R" "$R"
  mount -t proc proc "$R/proc"
  mount --rbind /sys "$R/sys"
  mount --rbind /dev "$R/dev"
  mount -t tmpfs -o mode=0755 tmpfs "$R/run"
  mkdir -p "$R/run/lock"
  H=$R/home/$USERNAME
  mount --bind "$DH_CR_RUSTUP" "$H/.rustup"
  mount -o remount,bind,ro "$H/.rustup"
  mount --bind "$DH_CR_CARGOBIN" "$H/.cargo/bin"
  mount -o remount,bind,ro "$H/.cargo/bin"
  mount --bind "$CACHE/apt-archives" "$R/var/cache/apt/archives"
  mkdir -p "$R/.oldroot"
  cd "$R"
  pivot_root . .oldroot
  cd /
  umount -l /.oldroot
  rmdir /.oldroot
  # From here on only the clean root's own programs run (this script is already read).
  as_user() { # command line, run as student through a login-less shell, like a terminal
    /usr/bin/env -i TERM="${TERM:-dumb}" HOME=/home/$USERNAME \
      PATH=/home/$USERNAME/.cargo/bin:/usr/local/bin:/usr/bin:/bin \
      /usr/sbin/runuser -u "$USERNAME" -- sh -c "cd ~/dindhelper && $1"
  }
  rc=0
  T=$(ts)
  log "phase demo: sudo scripts/demo.sh (as $USERNAME, in the clean root)"
  as_user 'sudo scripts/demo.sh' || rc=$?
  echo "demo $(el "$T") $rc" >&3
  [ "$rc" = 0 ] || log "demo.sh FAILED (exit $rc)"
  T=$(ts)
  log "phase stop: sudo scripts/demo.sh stop"
  src=0
  if [ "${DH_CLEANROOT_FAULT:-}" = skip-stop ]; then
    log "DH_CLEANROOT_FAULT=skip-stop: no stop (the checks below must fail)"
  else
    as_user 'sudo scripts/demo.sh stop' || src=$?
  fi
  echo "stop $(el "$T") $src" >&3
  if [ "$src" != 0 ]; then log "demo.sh stop FAILED (exit $src)"; [ "$rc" != 0 ] || rc=$src; fi
  # What only this side can see: the root's own /run/netns, mounts that are not ours.
  left=0
  ns=$(ls -A /run/netns 2>/dev/null || true)
  if [ -n "$ns" ]; then log "LEFT: network namespaces in the root: $ns"; left=1; fi
  ours=" / /proc /sys /dev /run /home/$USERNAME/.rustup /home/$USERNAME/.cargo/bin /var/cache/apt/archives "
  while read -r m; do
    case "$ours" in *" $m "*) continue ;; esac
    case "$m" in /sys/* | /dev/*) continue ;; esac # the binds' own submounts
    log "LEFT: mount $m"; left=1
  done < <(awk '{ print $5 }' /proc/self/mountinfo)
  [ "$left" = 0 ] || [ "$rc" != 0 ] || rc=1
  exit "$rc"
fi

# ---------------------------------------------------------------------------------------
# Outer side.
[ "$(id -u)" = 0 ] || { echo "tests/cleanroot/run.sh: run as root (chroot, mounts, loop devices)"; exit 1; }
case "${1:-}" in
  --clean) rm -rf --one-file-system "$CACHE"; echo "removed $CACHE"; exit 0 ;;
  --prepare | "") ;;
  *) echo "usage: $0 [--prepare|--clean]"; exit 2 ;;
esac
T_ALL=$(ts)
PHASES=()
phase() { PHASES+=("$(printf '%-8s %7s s  %s' "$1" "$2" "${3:-}")"); }

# tools on the machine
T=$(ts)
if ! command -v mmdebstrap >/dev/null; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap
fi
phase tools "$(el "$T")"

# the cached root, keyed by its recipe (this block's text)
RECIPE=$(cat <<'EOF'
mmdebstrap --mode=root --variant=minbase --format=directory --include=sudo
  hooks: useradd -m -u 1000 -s /bin/bash student;
  /etc/sudoers.d/student "student ALL=(ALL) NOPASSWD: ALL"; apt-archives bind
EOF
)
KEY=$SUITE-$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
BASE=$CACHE/$KEY/root
mkdir -p "$CACHE/apt-archives/partial"
T=$(ts)
if [ -f "$CACHE/$KEY/.done" ]; then
  phase root "$(el "$T")" "cached $BASE ($(du -sh "$BASE" | cut -f1))"
else
  log "phase root: mmdebstrap $SUITE into $BASE"
  rm -rf --one-file-system "$CACHE/$KEY"
  mkdir -p "$CACHE/$KEY"
  # No mirror given: mmdebstrap takes the machine's apt sources for this suite.
  mmdebstrap --mode=root --variant=minbase --format=directory --quiet --include=sudo \
    --customize-hook="chroot \"\$1\" useradd -m -u 1000 -s /bin/bash $USERNAME" \
    --customize-hook="echo '$USERNAME ALL=(ALL) NOPASSWD: ALL' >\"\$1/etc/sudoers.d/$USERNAME\"; chmod 0440 \"\$1/etc/sudoers.d/$USERNAME\"" \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$SUITE" "$BASE"
  touch "$CACHE/$KEY/.done"
  phase root "$(el "$T")" "built $BASE ($(du -sh "$BASE" | cut -f1))"
fi
# older recipes' roots go
for d in "$CACHE"/"$SUITE"-*; do
  [ "$d" = "$CACHE/$KEY" ] || rm -rf --one-file-system "$d"
done
if [ "${1:-}" = --prepare ]; then
  printf '%s\n' "${PHASES[@]}"
  exit 0
fi

# the Rust toolchain of the caller (only that is added)
# (under sudo: the calling user's, as demo.sh finds it)
home=${HOME:-/root}
if [ -z "${RUSTUP_HOME:-}" ] && [ ! -d "$home/.rustup" ] && [ -n "${SUDO_USER:-}" ]; then
  home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
fi
RUSTUP=${RUSTUP_HOME:-$home/.rustup}
CARGOBIN=${CARGO_HOME:-$home/.cargo}/bin
[ -x "$CARGOBIN/cargo" ] && [ -d "$RUSTUP/toolchains" ] ||
  { log "no rustup toolchain at $RUSTUP with cargo in $CARGOBIN"; exit 1; }

# what the machine looks like before (compared after)
snapshot() {
  echo "## loop"; losetup -nl -O NAME,BACK-FILE 2>/dev/null | sort
  echo "## netns"; ip netns list 2>/dev/null | sort
  echo "## mounts"; awk '{ print $5 }' /proc/self/mountinfo | sort
  echo "## cgroups"; find /sys/fs/cgroup -maxdepth 4 -type d \( -path '*/dind*' -o -path '*/docker*' \) 2>/dev/null | sort
}
BEFORE=$(snapshot)

SCRATCH=$(mktemp -d /var/tmp/dindhelper-cleanroot.XXXXXX)
R=$SCRATCH/root
FAILED=0
cleanup() {
  local rc=$? p pids m T
  trap - EXIT ERR INT TERM
  set +e
  T=$(ts)
  # Processes of the run that are still there: in its mount namespace, or rooted in the copy
  # (containers). All were started by this run: kill them by pid.
  local mntns="" n
  [ -f "$SCRATCH/mntns" ] && mntns=$(cat "$SCRATCH/mntns")
  pids=()
  for p in /proc/[0-9]*; do
    n=${p#/proc/}
    [ "$n" = $$ ] && continue
    if { [ -n "$mntns" ] && [ "$(readlink "$p/ns/mnt" 2>/dev/null)" = "$mntns" ]; } ||
       case "$(readlink "$p/root" 2>/dev/null)" in "$SCRATCH"/*) true ;; *) false ;; esac; then
      pids+=("$n")
    fi
  done
  if [ ${#pids[@]} -gt 0 ]; then
    log "LEFT: processes of the run: $(for p in "${pids[@]}"; do printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)"
    FAILED=1
    kill -9 "${pids[@]}" 2>/dev/null
    sleep 1
  fi
  # Loop devices backed by a file in the copy.
  while read -r dev file; do
    case "$file" in "$SCRATCH"/*) log "LEFT: $dev ($file)"; FAILED=1; losetup -d "$dev" ;; esac
  done < <(losetup -nl -O NAME,BACK-FILE 2>/dev/null)
  # cgroups the run made that are still there (empty once their processes are gone):
  # removed deepest first, so a failed run leaves none behind either.
  local after
  after=$(snapshot)
  comm -13 <(echo "$BEFORE" | sed -n '/^## cgroups/,$p' | sort) \
           <(echo "$after" | sed -n '/^## cgroups/,$p' | sort) | sort -r |
    while read -r d; do [ -d "$d" ] && rmdir "$d" 2>/dev/null && log "removed left cgroup $d"; done
  # The machine as found (compared before the removal above: a leak still fails the run).
  if [ "$after" != "$BEFORE" ]; then
    log "the machine differs from before the run:"
    diff <(echo "$BEFORE") <(echo "$after") | sed 's/^/  /'
    FAILED=1
  fi
  if awk -v s="$SCRATCH/" 'index($5, s) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
    log "mounts below $SCRATCH in the machine's namespace: not removing it"
    FAILED=1
  elif [ "${DH_CLEANROOT_KEEP:-}" = 1 ]; then
    log "DH_CLEANROOT_KEEP=1: kept $SCRATCH"
  else
    rm -rf --one-file-system "$SCRATCH"
  fi
  phase cleanup "$(el "$T")"
  phase total "$(el "$T_ALL")"
  printf '%s\n' "${PHASES[@]}"
  if [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; then
    log "FAILED"
    [ "$rc" != 0 ] || rc=1
  else
    log "PASSED"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# a fresh copy of the root, the repository in the user's home
T=$(ts)
cp -a "$BASE" "$R"
cp /etc/resolv.conf "$R/etc/resolv.conf"
# (in the copy: mmdebstrap removes a policy-rc.d that a hook puts into the root it builds)
printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
chmod 0755 "$R/usr/sbin/policy-rc.d"
cp /etc/hosts "$R/etc/hosts"
# The machine's own CAs (an admin's /usr/local/share/ca-certificates, e.g. a TLS-inspecting
# egress proxy's: without it cargo's crates.io fetch fails with "self-signed certificate in
# certificate chain"). Only the files: the demo's ca-certificates install trusts them.
if [ -d /usr/local/share/ca-certificates ]; then
  cp -a /usr/local/share/ca-certificates/. "$R/usr/local/share/ca-certificates/"
fi
# the places rustup would have made (the toolchain is bound onto them read-only); the rest of
# ~/.cargo (the registry) is the user's, empty
mkdir -p "$R/home/$USERNAME/dindhelper" "$R/home/$USERNAME/.rustup" "$R/home/$USERNAME/.cargo/bin"
(cd "$SRC" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -c) | tar -C "$R/home/$USERNAME/dindhelper" -x
chroot "$R" chown -R "$USERNAME:$USERNAME" "/home/$USERNAME"
phase copy "$(el "$T")" "$(du -sh "$R" | cut -f1) in $SCRATCH"

# demo and stop, in the private mount namespace
: >"$SCRATCH/phases"
irc=0
DH_CR_ROOT=$R DH_CR_SCRATCH=$SCRATCH DH_CR_RUSTUP=$RUSTUP DH_CR_CARGOBIN=$CARGOBIN DH_CLEANROOT_CACHE=$CACHE \
  unshare --mount --propagation private "$HERE/run.sh" --inner || irc=$?
while read -r name secs code; do phase "$name" "$secs" "exit $code"; done <"$SCRATCH/phases"
[ "$irc" = 0 ] || { log "the demo in the clean root FAILED (exit $irc)"; exit "$irc"; }
exit 0
}
