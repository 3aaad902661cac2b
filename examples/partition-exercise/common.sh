# Shared settings of the partition exercise (sourced by setup*.sh and teardown*.sh).
#
#   DH_BUS       D-Bus address of dindhelperd (default: the system bus)
#   DOCKER_HOST  dockerd the students' containers run on (docker CLI's own variable)
#   IMAGE        container image with /bin/busybox (default busybox:latest; a real class
#                uses its DinD image)
#   PREFIX       name prefix of everything made (default ex): instance ex-1, container
#                ex-1-dind, image ex-1-disk
#   PORT_BASE    student i gets host port PORT_BASE+i (default 8100) -> container port 80
#   DISK_SIZE    bytes of each student's disk image (default 64 MiB)
#   DH_CTL       dindhelperctl to use in the -ctl variants (default: from PATH)
set -euo pipefail
PREFIX=${PREFIX:-ex}
IMAGE=${IMAGE:-busybox:latest}
PORT_BASE=${PORT_BASE:-8100}
DISK_SIZE=${DISK_SIZE:-67108864}
DH_CTL=${DH_CTL:-dindhelperctl}
if [ -n "${DH_BUS:-}" ]; then
  BUSCTL=(busctl "--address=$DH_BUS")
  CTL=("$DH_CTL" --bus-address "$DH_BUS")
else
  BUSCTL=(busctl --system)
  CTL=("$DH_CTL")
fi
DH=(org.dindhelper1 /org/dindhelper1)

# The students' container: a long-running process (here busybox httpd answering
# "student-<i>" on port 80) standing in for the DinD daemon of a real class.
student_cmd() {
  echo "mkdir -p /tmp/www && echo student-$1 >/tmp/www/index.html && exec /bin/busybox httpd -f -p 80 -h /tmp/www"
}
