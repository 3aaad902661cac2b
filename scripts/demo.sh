#!/usr/bin/env bash
# The README's first command: install what is needed, build, bring dindhelperd up with
# everything it talks to, and show all five capabilities working.
#
#   sudo scripts/demo.sh          install packages, build, start, demonstrate; leaves the
#                                 daemon (and its private bus, polkitd, dockerd) running
#   sudo scripts/demo.sh stop     stop all of it and leave the machine as the demo found it
#
# What it brings up (all private, nothing of the machine's own is used or changed):
#   - a dbus-daemon of type system on unix:path=/run/dindhelper-demo/bus and the real
#     polkitd on it (polkit decides every call; the project's actions file is installed
#     for the run when the machine has none);
#   - a dockerd in its own network namespace (dhdemo-d), with a client namespace
#     (dhdemo-c, 10.99.0.2) joined by a veth to it (10.99.0.1); image bb:latest imported
#     from busybox-static (no registry). Always a private one, also when the machine runs
#     its own dockerd: the demo publishes ports, and the daemon writes them into the
#     chains of the network namespace it runs in. The machine's own firewall, containers
#     and network namespace are never touched;
#   - dindhelperd inside dhdemo-d (`nsenter --net`), state in /var/lib/dindhelper-demo.
# Everything it starts or makes is recorded in /run/dindhelper-demo (pids, namespaces,
# files it installed, cgroup parents that did not exist before); `stop` undoes exactly that
# and detaches loop devices backed by the demo's images. Packages it installed stay.
#
# A failure in the middle stops what was started (DEMO_KEEP=1 keeps it for a look).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
RUN=/run/dindhelper-demo
TOP=/var/lib/dindhelper-demo
STATE=$TOP/state
NS=dhdemo-d
CNS=dhdemo-c
# Short: containerd's socket paths under the exec root must fit in sun_path.
EXEC_ROOT=/run/dhdemo
ADDR=unix:path=$RUN/bus
DOCKER_SOCK=$RUN/docker.sock
POLKITD=/usr/lib/polkit-1/polkitd
POLICY=/usr/share/polkit-1/actions/org.dindhelper1.policy
T0=$SECONDS

step() { printf '\n\033[1m== [%s] %s\033[0m  (%ds)\n' "$1" "$2" "$((SECONDS - T0))"; }
say() { printf '%s\n' "$*"; }
record() { echo "$*" >>"$RUN/made"; }

stop_pid() { # name [seconds]: SIGTERM the pid in $RUN/<name>.pid, wait, SIGKILL
  local f="$RUN/$1.pid" p i
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for i in $(seq $((${2:-10} * 10))); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then
      say "  $1 (pid $p) did not stop on SIGTERM: SIGKILL"
      kill -9 "$p" 2>/dev/null || true
      sleep 0.2
    fi
    say "  stopped $1 (pid $p)"
  fi
  rm -f "$f"
}

stop() {
  [ -d "$RUN" ] || [ -d "$TOP" ] || { say "demo is not running"; return 0; }
  say "stopping the demo"
  # The daemon first (it may still hold loop devices and captures), dockerd next (it stops
  # its containers and its containerd), then polkitd and the bus.
  stop_pid monitor 2
  stop_pid daemon 10
  stop_pid dockerd 30
  stop_pid polkitd 5
  stop_pid dbus 5
  # Mounts dockerd left under its roots (deepest first).
  awk -v a="$TOP/" -v b="$EXEC_ROOT/" 'index($5, a) == 1 || index($5, b) == 1 { print $5 }' \
    /proc/self/mountinfo | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2- |
    while read -r m; do umount -l "$m" 2>/dev/null && say "  unmounted $m"; done
  # Loop devices backed by the demo's images (the daemon detaches its own on destroy; a
  # demo killed halfway may leave some).
  losetup -nl -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    case "$file" in "$TOP"/*) losetup -d "$dev" && say "  detached $dev ($file)" ;; esac
  done
  if [ -f "$RUN/made" ]; then
    while read -r kind what; do
      case "$kind" in
        netns) ip netns del "$what" 2>/dev/null && say "  deleted netns $what" ;;
        file) rm -f "$what" && say "  removed $what" ;;
        cgroup) # a parent group the demo caused: remove its empty subtree, deepest first
          if [ -d "$what" ]; then
            find "$what" -depth -type d -exec rmdir {} \; 2>/dev/null || true
            if [ -d "$what" ]; then say "  cgroup $what is not empty: left"; else say "  removed cgroup $what"; fi
          fi ;;
      esac
    done <"$RUN/made"
    # /run/netns: `ip netns add` makes it (and a shared self-bind mount on it) on a machine
    # that had none; it stays after the last `ip netns del`. Undone after the namespaces,
    # only when no namespace is left in it (plain umount: busy fails rather than detaches).
    while read -r kind what; do
      case "$kind" in
        mount) if [ -z "$(ls -A "$what" 2>/dev/null)" ] && umount "$what" 2>/dev/null; then
                 say "  unmounted $what"
               fi ;;
        dir) rmdir "$what" 2>/dev/null && say "  removed $what" ;;
      esac
    done < <(tac "$RUN/made")
  fi
  rm -rf "$EXEC_ROOT" "$TOP" "$RUN"
  say "demo stopped; the machine is as the demo found it (packages it installed stay)"
}

case "${1:-}" in
  stop) [ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }; stop; exit 0 ;;
  "") ;;
  *) say "usage: $0 [stop]"; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { say "run as root: sudo $0 (the daemon manages loop devices)"; exit 1; }

# A demo already running is stopped first: every run starts from a clean machine.
if [ -d "$RUN" ] || [ -d "$TOP" ]; then stop; fi

on_error() {
  local rc=$?
  say ""
  say "demo FAILED (exit $rc) after $((SECONDS - T0))s"
  for l in daemon.log dockerd.log polkitd.log; do
    if [ -f "$RUN/$l" ]; then say "---- $l (last 20 lines)"; tail -n 20 "$RUN/$l"; fi
  done
  if [ "${DEMO_KEEP:-}" = 1 ]; then
    say "DEMO_KEEP=1: left running; sudo $0 stop cleans up"
  else
    stop
  fi
  exit "$rc"
}
trap on_error ERR

# ---------------------------------------------------------------------------------------
step 1/9 "packages (apt-get; only what is missing)"
# ca-certificates: cargo's first build fetches the crates from crates.io over https (found
# by tests/cleanroot/run.sh: in a minbase root it came only as a Recommends of curl).
PKGS=(dbus polkitd systemd fdisk util-linux docker.io iptables tcpdump busybox-static curl
      iproute2 procps libpcap-dev gcc libc6-dev ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  say "all present: ${PKGS[*]}"
fi

# ---------------------------------------------------------------------------------------
step 2/9 "build (cargo build --bins; the first build takes a few minutes, cargo prints each crate)"
# rustup installs cargo per user: look where sudo's PATH does not.
CARGO=$(command -v cargo || true)
for c in "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo}" /root/.cargo/bin/cargo; do
  [ -z "$CARGO" ] && [ -n "$c" ] && [ -x "$c" ] && CARGO=$c
done
[ -n "$CARGO" ] || { say "cargo not found: install the Rust toolchain (https://rustup.rs), then run again"; exit 1; }
# The dev profile: the demo shows what the daemon does, not how fast, and the test
# command that follows in the README (and in .ci/run) reuses this build.
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && [ "$(stat -c %U .)" = "$SUDO_USER" ]; then
  # The checkout belongs to the user who called sudo: build as them (their toolchain,
  # target/ stays theirs).
  runuser -u "$SUDO_USER" -- env PATH="$(dirname "$CARGO"):$PATH" "$CARGO" build --bins --locked
else
  "$CARGO" build --bins --locked
fi
BIN=$SRC/target/debug
ctl() { "$BIN/dindhelperctl" --bus-address "$ADDR" "$@"; }
CTL() { printf '\033[36m$ dindhelperctl %s\033[0m\n' "$*" >&2; ctl "$@"; }
DOCKER() { docker -H "unix://$DOCKER_SOCK" "$@"; }
RUNV() { printf '\033[36m$ %s\033[0m\n' "$*" >&2; "$@"; }
CLIENT() { nsenter --net="/run/netns/$CNS" "$@"; }

# ---------------------------------------------------------------------------------------
step 3/9 "private system bus + polkitd"
mkdir -p "$RUN" "$TOP"
chmod 0755 "$RUN" # polkitd drops to user polkitd and must reach the socket
: >"$RUN/made"
# cgroup parents the instance backend or dockerd may create, when they are not there now.
for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do
  [ -d "$h" ] && [ -f "$h/cgroup.procs" ] || continue
  # dind/lab-1 first: when dind was already there, a demo that failed halfway still
  # leaves no instance group behind.
  for n in dind/lab-1 dind docker; do [ -d "$h$n" ] || record cgroup "$h$n"; done
done
cat >"$RUN/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>$ADDR</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/>
    <allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
CONF
dbus-daemon --config-file="$RUN/bus.conf" --fork --print-pid >"$RUN/dbus.pid"
say "dbus-daemon pid $(cat "$RUN/dbus.pid") on $ADDR"
if [ ! -f "$POLICY" ]; then
  install -m 0644 polkit/org.dindhelper1.policy "$POLICY"
  record file "$POLICY"
  say "installed $POLICY for the demo (removed by stop)"
fi
DBUS_SYSTEM_BUS_ADDRESS=$ADDR setsid "$POLKITD" --no-debug </dev/null >"$RUN/polkitd.log" 2>&1 &
echo $! >"$RUN/polkitd.pid"
for _ in $(seq 150); do
  busctl --address="$ADDR" status org.freedesktop.PolicyKit1 >/dev/null 2>&1 && break; sleep 0.1
done
busctl --address="$ADDR" status org.freedesktop.PolicyKit1 >/dev/null
say "polkitd pid $(cat "$RUN/polkitd.pid") answers on the bus"

# ---------------------------------------------------------------------------------------
step 4/9 "private dockerd in network namespace $NS"
[ -d /run/netns ] || record dir /run/netns
mountpoint -q /run/netns || record mount /run/netns
ip netns add "$NS"; record netns "$NS"
ip netns add "$CNS"; record netns "$CNS"
ip -n "$NS" link set lo up
ip -n "$CNS" link set lo up
ip -n "$NS" link add vdh type veth peer name vcl netns "$CNS"
ip -n "$NS" addr add 10.99.0.1/24 dev vdh
ip -n "$CNS" addr add 10.99.0.2/24 dev vcl
ip -n "$NS" link set vdh up
ip -n "$CNS" link set vcl up
mkdir -p "$TOP/docker" "$EXEC_ROOT"
# nsenter, not `ip netns exec` (which remounts /sys: dockerd then finds no cgroups).
setsid nsenter --net="/run/netns/$NS" dockerd --data-root "$TOP/docker" --exec-root "$EXEC_ROOT" \
  --pidfile "$TOP/docker.pid" -H "unix://$DOCKER_SOCK" </dev/null >"$RUN/dockerd.log" 2>&1 &
echo $! >"$RUN/dockerd.pid" # nsenter execs: this is dockerd's pid
for _ in $(seq 600); do DOCKER version >/dev/null 2>&1 && break; sleep 0.1; done
DOCKER version --format 'dockerd {{.Server.Version}} answers (pid '"$(cat "$RUN/dockerd.pid")"')'
rm -rf "$TOP/image" && mkdir -p "$TOP/image/bin" "$TOP/image/www" "$TOP/image/tmp"
cp /bin/busybox "$TOP/image/bin/" && ln -s busybox "$TOP/image/bin/sh"
echo "hello from the demo container" >"$TOP/image/www/index.html"
tar -C "$TOP/image" -c . | DOCKER import - bb:latest >/dev/null
say "image bb:latest imported from busybox-static"

# ---------------------------------------------------------------------------------------
step 5/9 "dindhelperd (in $NS, --docker-host unix://$DOCKER_SOCK)"
setsid nsenter --net="/run/netns/$NS" "$BIN/dindhelperd" --bus-address "$ADDR" \
  --state-dir "$STATE" --docker-host "unix://$DOCKER_SOCK" </dev/null >"$RUN/daemon.log" 2>&1 &
echo $! >"$RUN/daemon.pid"
for _ in $(seq 100); do
  busctl --address="$ADDR" status org.dindhelper1 >/dev/null 2>&1 && break; sleep 0.1
done
busctl --address="$ADDR" status org.dindhelper1 >/dev/null
say "dindhelperd pid $(cat "$RUN/daemon.pid") owns org.dindhelper1"
RUNV busctl --address="$ADDR" tree org.dindhelper1
# Every signal of the daemon from here on, shown at the end.
"$BIN/dindhelperctl" --bus-address "$ADDR" monitor >"$RUN/monitor.log" 2>/dev/null </dev/null &
echo $! >"$RUN/monitor.pid"
say "polkit decides: a plain user (nobody) is refused, exit code 3 = NotAuthorized:"
printf '\033[36m$ runuser -u nobody -- dindhelperctl image create x 1M\033[0m\n'
rc=0
runuser -u nobody -- "$BIN/dindhelperctl" --bus-address "$ADDR" image create x 1M || rc=$?
say "exit $rc"
[ "$rc" = 3 ]

# ---------------------------------------------------------------------------------------
step 6/9 "instance with limits, a container adopted into it"
parent=$(CTL instance create lab-1 --cpu-quota-percent 50 --memory-max 256M --tasks-max 64)
say "$parent"
RUNV docker -H "unix://$DOCKER_SOCK" run -d --name lab-1-web --cgroup-parent "$parent" \
  bb:latest /bin/busybox httpd -f -p 80 -h /www
CTL instance adopt lab-1 lab-1-web
CTL instance list
pid=$(DOCKER inspect -f '{{.State.Pid}}' lab-1-web)
say "what the kernel enforces for the container's process $pid:"
for f in memory/memory.limit_in_bytes pids/pids.max cpu,cpuacct/cpu.cfs_quota_us \
         cpu/cpu.cfs_quota_us memory.max pids.max cpu.max; do
  for base in /sys/fs/cgroup/dind/lab-1 /sys/fs/cgroup/"${f%%/*}"/dind/lab-1; do
    file="$base/${f#*/}"
    if [ -f "$file" ]; then say "  $file = $(cat "$file")"; fi
  done
done | sort -u
say "  /proc/$pid/oom_score_adj = $(cat "/proc/$pid/oom_score_adj")"

# ---------------------------------------------------------------------------------------
step 7/9 "a port published on the running container, reached with curl"
CTL port publish lab-1-web tcp 8080 80 --instance lab-1
CTL port list
printf '\033[36m$ curl http://10.99.0.1:8080/   (from the client namespace %s)\033[0m\n' "$CNS"
for _ in $(seq 50); do CLIENT curl -s --max-time 2 http://10.99.0.1:8080/ && break; sleep 0.1; done

# ---------------------------------------------------------------------------------------
step 8/9 "captures in the container's network namespace, read with tcpdump"
out=$(CTL --json capture start lab-1-web --filter 'tcp port 80' --duration 60)
session=$(echo "$out" | sed -n 's/.*"session":"\([^"]*\)".*/\1/p')
file=$(echo "$out" | sed -n 's/.*"file":"\([^"]*\)".*/\1/p')
say "session $session writes $file"
CLIENT curl -s --max-time 2 -o /dev/null http://10.99.0.1:8080/
CTL capture list
CTL capture stop "$session"
RUNV tcpdump -nn -r "$file"
say "and streamed to a pipe (StartCaptureFd), 4 packets:"
printf '\033[36m$ dindhelperctl capture lab-1-web --count 4 --filter "tcp port 80" | tcpdump -nn -r -\033[0m\n'
(ctl capture lab-1-web --count 4 --filter 'tcp port 80' --duration 20 | tcpdump -nn -r - 2>&1) &
follower=$!
for _ in $(seq 100); do
  kill -0 "$follower" 2>/dev/null || break
  CLIENT curl -s --max-time 1 -o /dev/null http://10.99.0.1:8080/ || true
  sleep 0.2
done
wait "$follower"

# ---------------------------------------------------------------------------------------
step 9/9 "image, loop device, partitions, exposed to the container"
CTL image create disk 64M
dev=$(CTL loop attach disk --instance lab-1)
say "$dev"
printf '\033[36m$ sfdisk %s   (GPT, 2 partitions; the kernel learns of them only from Rescan)\033[0m\n' "$dev"
printf 'label: gpt\n,16M\n,\n' | sfdisk -q --no-reread --no-tell-kernel "$dev"
CTL rescan "$dev"
CTL list
CTL expose "$dev" lab-1-web
n=${dev#/dev/}
printf '\033[36m$ docker exec lab-1-web sh -c "ls -l /dev/%s*"\033[0m\n' "$n" >&2
DOCKER exec lab-1-web sh -c "ls -l /dev/$n*"
printf '\033[36m$ docker exec lab-1-web sh -c "echo written-inside >/dev/%sp1"\033[0m\n' "$n" >&2
DOCKER exec lab-1-web sh -c "echo written-inside | dd of=/dev/${n}p1 bs=512 conv=sync 2>/dev/null"
say "read back on the host: $(dd if="${dev}p1" bs=14 count=1 2>/dev/null)"
if busctl --address="$ADDR" introspect org.dindhelper1 /org/dindhelper1 org.dindhelper1.Devices 2>/dev/null |
    grep -q RevokeFromContainer; then
  CTL exposures
  CTL revoke "$dev" lab-1-web
fi

# ---------------------------------------------------------------------------------------
step done "one call tears the instance down: ports, captures, loop devices, images, cgroup"
CTL instance destroy lab-1 --force --delete-images
DOCKER rm -f lab-1-web >/dev/null 2>&1 || true
CTL list
CTL port list
say ""
say "signals the daemon sent meanwhile (dindhelperctl monitor, first 12 of $(wc -l <"$RUN/monitor.log")):"
head -n 12 "$RUN/monitor.log" | cut -c1-150
say ""
say "demo took $((SECONDS - T0))s. dindhelperd is running (pid $(cat "$RUN/daemon.pid"), log $RUN/daemon.log)."
say "try:   $BIN/dindhelperctl --bus-address $ADDR --help"
say "       busctl --address=$ADDR introspect org.dindhelper1 /org/dindhelper1"
say "       docker -H unix://$DOCKER_SOCK ps"
say "stop:  sudo scripts/demo.sh stop"
