#!/usr/bin/env bash
# Remove everything setup.sh (or setup-ctl.sh) made, with busctl only: one DestroyInstance
# per instance named $PREFIX-* (its port, loop device, image and cgroup; force: the
# container's processes are killed), then the containers.
. "$(dirname "$0")/common.sh"
# ListInstances -> a(osssua{sv}) …: every quoted instance name "$PREFIX-<n>"
for inst in $("${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Instances ListInstances |
    grep -o "\"$PREFIX-[0-9]*\"" | tr -d '"' | sort -u); do
  "${BUSCTL[@]}" call "${DH[@]}" org.dindhelper1.Instances DestroyInstance 'sa{sv}' \
    "$inst" 2 force b true delete_images b true >/dev/null
  echo "destroyed $inst"
done
for c in $(docker ps -aq --filter "name=^/?$PREFIX-[0-9]+-dind\$"); do
  docker rm -f "$c" >/dev/null && echo "removed container $c"
done
