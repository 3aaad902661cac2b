#!/bin/bash
# The instances bench on a real cgroup v2 host (inside the guest, as root, after tests.sh
# installed the daemon): N instances with limits created + destroyed through dindhelperd
# (one busctl process per call, an admin's shell loop) against the same slices made with
# `systemctl set-property --runtime` + start / stop, in the same run, as benches/instances.rs
# does in nspawn.  Prints both times and the ratio (daemon / systemctl).  DH_VM_BENCH_N (20).
set -euo pipefail
N=${DH_VM_BENCH_N:-20}
call="busctl call org.dindhelper1 /org/dindhelper1 org.dindhelper1.Instances"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
# warm-up: activation, polkitd, the first slice under dind.slice
$call CreateInstance sa{sv} warm 0 >/dev/null && $call DestroyInstance sa{sv} warm 0 >/dev/null
systemctl set-property --runtime dind-warm2.slice TasksMax=100 && systemctl start dind-warm2.slice && systemctl stop dind-warm2.slice
t=$(date +%s%N)
for i in $(seq 1 $N); do $call CreateInstance sa{sv} b$i 3 cpu_quota_percent u 50 memory_max t 268435456 tasks_max t 100 >/dev/null; done
dc=$(ms $t)
[ "$(systemctl list-units --type=slice --state=active --no-legend 'dind-b*' | wc -l)" = "$N" ] || { echo "bench: not $N slices"; exit 1; }
t=$(date +%s%N)
for i in $(seq 1 $N); do $call DestroyInstance sa{sv} b$i 0 >/dev/null; done
dd=$(ms $t)
t=$(date +%s%N)
for i in $(seq 1 $N); do systemctl set-property --runtime dind-s$i.slice CPUQuota=50% MemoryMax=268435456 TasksMax=100 && systemctl start dind-s$i.slice; done
sc=$(ms $t)
t=$(date +%s%N)
for i in $(seq 1 $N); do systemctl stop dind-s$i.slice; done
sd=$(ms $t)
t=$(date +%s%N)
for i in $(seq 1 $N); do $call ListInstances >/dev/null; done
fl=$(ms $t)
echo "bench instances ($N, $(uname -r), systemd $(systemctl --version | awk 'NR==1{print $2}')):"
echo "  dindhelperd (busctl per call): create $dc ms  destroy $dd ms  total $((dc + dd)) ms"
echo "  systemctl set-property+start/stop: create $sc ms  destroy $sd ms  total $((sc + sd)) ms"
echo "  floor: $N busctl ListInstances: $fl ms"
awk -v d=$((dc + dd)) -v s=$((sc + sd)) 'BEGIN{printf "  ratio daemon/systemctl: %.2f\n", d / s}'
