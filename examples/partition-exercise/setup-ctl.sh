#!/usr/bin/env bash
# setup.sh with dindhelperctl instead of busctl (same result; see setup.sh).
. "$(dirname "$0")/common.sh"
N=${1:?usage: setup-ctl.sh N}
for i in $(seq 1 "$N"); do
  inst=$PREFIX-$i cont=$PREFIX-$i-dind img=$PREFIX-$i-disk port=$((PORT_BASE + i))
  parent=$("${CTL[@]}" instance create "$inst" --cpu-quota-percent 50 --memory-max 256M \
    --tasks-max 256)
  docker run -d --name "$cont" --cgroup-parent "$parent" "$IMAGE" \
    /bin/busybox sh -c "$(student_cmd "$i")" >/dev/null
  "${CTL[@]}" instance adopt "$inst" "$cont" >/dev/null
  "${CTL[@]}" image create "$img" "$DISK_SIZE" >/dev/null
  dev=$("${CTL[@]}" loop attach "$img" --instance "$inst")
  "${CTL[@]}" expose "$dev" "$cont" >/dev/null
  "${CTL[@]}" port publish "$cont" tcp "$port" 80 --instance "$inst" >/dev/null
  echo "student $i: instance $inst (cgroup $parent), container $cont, disk $dev, port $port"
done
