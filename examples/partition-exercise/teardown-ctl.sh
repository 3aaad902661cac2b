#!/usr/bin/env bash
# teardown.sh with dindhelperctl instead of busctl.
. "$(dirname "$0")/common.sh"
for inst in $("${CTL[@]}" instance list | awk -v p="^$PREFIX-[0-9]+\$" 'NR > 1 && $1 ~ p { print $1 }'); do
  "${CTL[@]}" instance destroy "$inst" --force --delete-images >/dev/null
  echo "destroyed $inst"
done
for c in $(docker ps -aq --filter "name=^/?$PREFIX-[0-9]+-dind\$"); do
  docker rm -f "$c" >/dev/null && echo "removed container $c"
done
