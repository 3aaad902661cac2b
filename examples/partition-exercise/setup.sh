#!/usr/bin/env bash
# Give each of N students a partitioning exercise, with busctl only (the admin's path):
#   an instance with limits, a container in it (adopted: oom_score_adj), a disk image
#   attached to a loop device tagged with the instance and exposed in the container's
#   /dev (the student partitions it there), and a published port.
#
#   sudo examples/partition-exercise/setup.sh 30
#   sudo examples/partition-exercise/teardown.sh
# Settings: see common.sh. setup-ctl.sh does the same with dindhelperctl.
. "$(dirname "$0")/common.sh"
N=${1:?usage: setup.sh N}
for i in $(seq 1 "$N"); do
  inst=$PREFIX-$i cont=$PREFIX-$i-dind img=$PREFIX-$i-disk port=$((PORT_BASE + i))
  # -> oss "/org/dindhelper1/instance/…" "dind-….slice" "/dind/ex-1"  (field 6: cgroup parent)
  parent=$("${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Instances CreateInstance 'sa{sv}' \
      "$inst" 3 cpu_quota_percent u 50 memory_max t 268435456 tasks_max t 256 |
    awk -F'"' '{ print $6 }')
  docker run -d --name "$cont" --cgroup-parent "$parent" "$IMAGE" \
    /bin/busybox sh -c "$(student_cmd "$i")" >/dev/null
  "${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Instances AdoptContainer 'ssa{sv}' \
    "$inst" "$cont" 0 >/dev/null
  "${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Manager CreateImage 'sta{sv}' \
    "$img" "$DISK_SIZE" 0 >/dev/null
  # -> os "/org/dindhelper1/loop/loop3" "/dev/loop3"
  dev=$("${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Manager AttachImage 'sa{sv}' \
      "$img" 1 instance s "$inst" | awk -F'"' '{ print $4 }')
  "${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Devices ExposeToContainer 'ssa{sv}' \
    "$dev" "$cont" 0 >/dev/null
  "${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Ports Publish 'ssqqa{sv}' \
    "$cont" tcp "$port" 80 1 instance s "$inst" >/dev/null
  echo "student $i: instance $inst (cgroup $parent), container $cont, disk $dev, port $port"
done
