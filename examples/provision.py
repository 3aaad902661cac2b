#!/usr/bin/python3
"""A provisioning service's whole flow for one student, over dindhelper's D-Bus API.

The client is Python dbus-fast (Debian: apt-get install python3-dbus-fast; PyPI:
dbus-fast): its proxies are built from the daemon's live introspection, so this also shows
that the API can be used by a client of another ecosystem without generated code.

Steps (each printed with its duration; the last line is a JSON summary):
  1. CreateInstance STUDENT with limits           -> slice/cgroup, the cgroup parent
  2. docker run the student's container with --cgroup-parent, then AdoptContainer
  3. CreateImage STUDENT-disk and AttachImage it, tagged with the instance
  4. Publish HOST_PORT -> the container's port 80, tagged with the instance
  5. StartCapture in the container (tcp port 80), fetch --probe-url, Stop, read Packets
  6. teardown: docker rm -f the container, DestroyInstance (delete_images, force): it
     unpublishes, stops captures, detaches and deletes the image, removes the slice
Step 6 also runs when an earlier step fails (nothing is left behind), unless --keep.

Run as root (or as a user whom polkit allows the org.dindhelper1.* actions used), e.g.:
  examples/provision.py --student alice --host-port 8080 \\
      --image busybox:latest --probe-url http://127.0.0.1:8080/
Arguments: see --help. The docker CLI must be installed (the container is started with it).
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request

from dbus_fast import BusType, DBusError, Variant
from dbus_fast.aio import MessageBus

NAME = "org.dindhelper1"
ROOT = "/org/dindhelper1"
MIB = 1 << 20


class Flow:
    def __init__(self, args):
        self.a = args
        self.steps = []
        self.summary = {"student": args.student}

    def step(self, what, t0, detail=""):
        ms = (time.monotonic() - t0) * 1000
        self.steps.append({"step": what, "ms": round(ms, 1)})
        print(f"[{ms:8.1f} ms] {what}{': ' + detail if detail else ''}", flush=True)

    def docker(self, *argv, check=True):
        cmd = ["docker", "-H", self.a.docker_host, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout.strip()

    async def iface(self, path, interface):
        node = await self.bus.introspect(NAME, path)
        return self.bus.get_proxy_object(NAME, path, node).get_interface(interface)

    async def run(self):
        a = self.a
        if a.bus_address:
            self.bus = await MessageBus(bus_address=a.bus_address, bus_type=BusType.SYSTEM).connect()
        else:
            self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.instances = await self.iface(ROOT, NAME + ".Instances")
        self.manager = await self.iface(ROOT, NAME + ".Manager")
        self.ports = await self.iface(ROOT, NAME + ".Ports")
        self.captures = await self.iface(ROOT, NAME + ".Captures")
        self.container = f"{a.student}-dind"
        self.image = f"{a.student}-disk"
        try:
            await self.provision()
        finally:
            if not a.keep:
                await self.teardown()
            self.bus.disconnect()

    async def provision(self):
        a = self.a
        t = time.monotonic()
        obj, slice_unit, parent = await self.instances.call_create_instance(
            a.student,
            {
                "cpu_quota_percent": Variant("u", a.cpu_quota_percent),
                "memory_max": Variant("t", a.memory_max_mib * MIB),
                "tasks_max": Variant("t", a.tasks_max),
            },
        )
        self.summary.update(instance=obj, slice_unit=slice_unit, cgroup_parent=parent)
        self.step("CreateInstance", t, f"{obj} ({slice_unit}, cgroup parent {parent})")

        t = time.monotonic()
        self.docker("run", "-d", "--name", self.container, "--cgroup-parent", parent,
                    a.image, *a.cmd.split())
        cid, cgroup, pids, adj = await self.instances.call_adopt_container(
            a.student, self.container, {})
        self.summary.update(container_id=cid, oom_score_adj=adj)
        self.step("docker run + AdoptContainer", t,
                  f"{cid[:12]} in {cgroup}, {len(pids)} pids, oom_score_adj {adj}")

        t = time.monotonic()
        await self.manager.call_create_image(self.image, a.image_mib * MIB, {})
        loop_obj, device = await self.manager.call_attach_image(
            self.image, {"instance": Variant("s", a.student)})
        self.summary.update(device=device)
        self.step("CreateImage + AttachImage", t, f"{self.image} on {device}")

        t = time.monotonic()
        mapping = await self.ports.call_publish(
            self.container, "tcp", a.host_port, a.container_port,
            {"instance": Variant("s", a.student)})
        self.summary.update(mapping=mapping)
        self.step("Publish", t, f"host port {a.host_port} -> {a.container_port} ({mapping})")

        t = time.monotonic()
        session, path = await self.captures.call_start_capture(
            self.container,
            {
                "filter": Variant("s", f"tcp port {a.container_port}"),
                "duration": Variant("u", 60),
                "instance": Variant("s", a.student),
                "name": Variant("s", f"{a.student}-provision"),
            },
        )
        body = ""
        if a.probe_url:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(a.probe_url, timeout=2) as r:
                        body = r.read().decode(errors="replace").strip()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        capture = await self.iface(session, NAME + ".Capture")
        await capture.call_stop({})
        packets = await capture.get_packets()
        self.summary.update(capture=path, packets=packets, probe=body)
        self.step("StartCapture + probe + Stop", t,
                  f"{packets} packets in {path}" + (f", probe said {body!r}" if a.probe_url else ""))

    async def teardown(self):
        t = time.monotonic()
        self.docker("rm", "-f", self.container, check=False)
        try:  # an image that was created but never attached is not the instance's
            await self.manager.call_delete_image(self.image, {})
        except DBusError:
            pass
        try:
            done = await self.instances.call_destroy_instance(
                self.a.student,
                {"delete_images": Variant("b", True), "force": Variant("b", True)})
        except DBusError as e:
            self.summary.update(destroyed=[f"{e.type}: {e.text}"])
            if e.type == NAME + ".Error.NotFound" and "instance" not in self.summary:
                return  # CreateInstance itself had failed: nothing to destroy
            raise
        self.summary.update(destroyed=done)
        self.step("teardown", t, "; ".join(done))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bus-address", help="D-Bus address (default: the system bus)")
    p.add_argument("--docker-host", default="unix:///var/run/docker.sock")
    p.add_argument("--student", required=True, help="instance name, [a-z0-9-]{1,48}")
    p.add_argument("--image", default="docker:dind", help="the student's container image")
    p.add_argument("--cmd", default="", help="command for the container (split on spaces)")
    p.add_argument("--host-port", type=int, required=True)
    p.add_argument("--container-port", type=int, default=80)
    p.add_argument("--probe-url", help="URL fetched while the capture runs")
    p.add_argument("--cpu-quota-percent", type=int, default=100)
    p.add_argument("--memory-max-mib", type=int, default=1024)
    p.add_argument("--tasks-max", type=int, default=1024)
    p.add_argument("--image-mib", type=int, default=64, help="size of the student's disk image")
    p.add_argument("--keep", action="store_true", help="leave everything in place (no step 6)")
    a = p.parse_args()
    flow = Flow(a)
    ok = True
    try:
        asyncio.run(flow.run())
    except Exception as e:
        ok = False
        print(f"provision failed: {type(e).__name__}: {e}", file=sys.stderr)
    flow.summary["steps"] = flow.steps
    flow.summary["ok"] = ok
    print(json.dumps(flow.summary, sort_keys=True))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
