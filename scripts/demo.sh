#!/usr/bin/env bash
# Bring dindhelperd up and show it working.
#
#   sudo scripts/demo.sh          build, start (system bus if one runs, else a private bus),
#                                 exercise image -> loop -> partitions -> detach
#   sudo scripts/demo.sh stop     stop what the demo started
#
# On a machine without a system bus the demo runs its own dbus-daemon (system-bus
# config, socket /run/dindhelper-demo/socket) and the daemon's state lives in
# /var/lib/dindhelper-demo. Everything it starts is recorded in /run/dindhelper-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=/run/dindhelper-demo
STATE=/var/lib/dindhelper-demo

stop() {
  for p in daemon dbus; do
    if [ -f "$RUN/$p.pid" ]; then
      kill "$(cat "$RUN/$p.pid")" 2>/dev/null || true
      rm -f "$RUN/$p.pid"
    fi
  done
  echo "demo stopped (state kept in $STATE; rm -rf it to forget)"
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "run as root (the daemon manages loop devices)"; exit 1; }

need=()
command -v dbus-daemon >/dev/null || need+=(dbus)
command -v busctl >/dev/null || need+=(systemd)
command -v sfdisk >/dev/null || need+=(fdisk)
command -v losetup >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

cargo build --release --bins -q
BIN=target/release

mkdir -p "$RUN"
if [ -S /run/dbus/system_bus_socket ] && busctl status >/dev/null 2>&1; then
  ADDR=unix:path=/run/dbus/system_bus_socket
  echo "using the system bus (install dbus/org.dindhelper1.conf first: make install)"
else
  ADDR=unix:path=$RUN/socket
  if ! [ -f "$RUN/dbus.pid" ] || ! kill -0 "$(cat "$RUN/dbus.pid")" 2>/dev/null; then
    cat > "$RUN/bus.conf" <<CONF
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
    dbus-daemon --config-file="$RUN/bus.conf" --fork --print-pid > "$RUN/dbus.pid"
  fi
  echo "private system-type bus at $ADDR (no polkitd on it: only root is allowed)"
fi

if [ -f "$RUN/daemon.pid" ] && kill -0 "$(cat "$RUN/daemon.pid")" 2>/dev/null; then
  kill "$(cat "$RUN/daemon.pid")"; sleep 0.5
fi
"$BIN/dindhelperd" --bus-address "$ADDR" --state-dir "$STATE" >"$RUN/daemon.log" 2>&1 </dev/null &
echo $! > "$RUN/daemon.pid"
for _ in $(seq 50); do
  busctl --address="$ADDR" status org.dindhelper1 >/dev/null 2>&1 && break; sleep 0.1
done

bc() { echo "+ busctl $*" >&2; busctl --address="$ADDR" "$@"; }
CTL() { echo "+ dindhelperctl $*" >&2; "$BIN/dindhelperctl" --bus-address "$ADDR" "$@"; }

CTL image delete demo.img 2>/dev/null || true
bc call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Manager CreateImage sta{sv} demo.img 67108864 0
out=$(bc call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Manager AttachImage sa{sv} demo.img 0)
echo "$out"
dev=$(echo "$out" | sed -n 's/.*"\(\/dev\/loop[0-9]*\)".*/\1/p')
echo "+ sfdisk $dev (GPT, 3 partitions)"
printf 'label: gpt\n,16M\n,16M\n,\n' | sfdisk -q --no-reread --no-tell-kernel "$dev"   # the kernel learns of them only from Rescan
bc call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Manager Rescan sa{sv} "$dev" 0
ls -l "${dev}"p*
bc tree org.dindhelper1
CTL list
bc call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Manager Detach sa{sv} "$dev" 0
CTL image delete demo.img
echo
echo "dindhelperd is running (pid $(cat "$RUN/daemon.pid"), log $RUN/daemon.log) on $ADDR"
echo "try:  busctl --address=$ADDR introspect org.dindhelper1 /org/dindhelper1"
echo "stop: sudo scripts/demo.sh stop"
