#!/bin/sh
# Capture benchmark (root): UDP flood over a veth between netns dhc-fa/dhc-fb at rising
# rates; dindhelper's capture and `nsenter --net=... tcpdump -i any -w` capture the same
# traffic in the same run. FLOODERS=N runs N senders in
# parallel, SIZE=bytes sets the UDP payload (64). Usage: bench/capture.sh [SECS] [RATES...]  (rate 0 = max)
# Build first: cargo build --example capture_bench --config 'profile.dev.package.dindhelper.opt-level=3'
set -eu
BIN=${BIN:-target/debug/examples/capture_bench}
SECS=${1:-3}; shift || true
RATES=${*:-"20000 50000 100000 200000 0"}
W=$(mktemp -d /var/tmp/dhc-bench.XXXXXX)
cleanup() {
  [ -n "${SP:-}" ] && kill "$SP" 2>/dev/null || true
  ip netns del dhc-fa 2>/dev/null || true; ip netns del dhc-fb 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
ip netns add dhc-fa; ip netns add dhc-fb
ip link add dhcfa netns dhc-fa type veth peer name dhcfb netns dhc-fb
ip -n dhc-fa addr add 10.98.200.1/24 dev dhcfa; ip -n dhc-fb addr add 10.98.200.2/24 dev dhcfb
ip -n dhc-fa link set dhcfa up; ip -n dhc-fb link set dhcfb up
ip -n dhc-fa link set lo up; ip -n dhc-fb link set lo up
ip netns exec dhc-fa sleep 3600 & SP=$!
sleep 0.3
TP=$(pgrep -P $SP || echo $SP)
printf '%-8s %-10s %-24s %-24s\n' rate sent dindhelper "tcpdump -B 4096"
for R in $RATES; do
  nsenter --net=/run/netns/dhc-fa tcpdump -Z root -B 4096 -i any -w $W/t.pcap udp port 9999 2>$W/t.err & TD=$!
  $BIN capture $SP $(echo "$SECS + 1.5" | bc) $W/d.pcap 'udp port 9999' >$W/d.out & DH=$!
  sleep 0.7
  FP=""
  for i in $(seq ${FLOODERS:-1}); do
    ip netns exec dhc-fb $BIN flood 10.98.200.1:9999 $R $SECS ${SIZE:-64} >$W/f$i.out & FP="$FP $!"
  done
  wait $FP
  SENT=$(cat $W/f*.out | awk '{s+=$2} END{print s}'); rm -f $W/f*.out
  wait $DH
  kill -INT $TD; wait $TD || true
  D=$(sed -E 's/dindhelper: ([0-9]+) packets captured, ([0-9]+) dropped.*/\1 cap, \2 drop/' $W/d.out)
  T=$(awk '/captured/{c=$1} /dropped by kernel/{d=$1} END{print c" cap, "d" drop"}' $W/t.err)
  printf '%-8s %-10s %-24s %-24s\n' "$R" "$SENT" "$D" "$T"
done
