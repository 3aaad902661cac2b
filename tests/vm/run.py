#!/usr/bin/env python3
"""The VM suite: the installed daemon end to end in Debian guests under qemu.

usage: run.py [--guest trixie|bookworm|all] [--with-pending] [--only SUBSTR]... [--keep-going]

Per guest: build or reuse the image (tests/vm/build-image.sh), stage the payload (release
binaries from ./target/release + the project's system files + guest/tests.sh), boot once,
run every test of guest/tests.sh in order (one guest-exec each), shut down.  Prints
`test <guest>/<name> ... ok|FAILED (seconds)` per test (the output of failed tests below
it) and ends with `N passed, N failed`; exits 1 on any failure.  A missing qemu, a failed
image build or a failed boot is a failure, never a skip.

--with-pending (or DH_VM_PENDING=1) also runs the tests that wait for fixes on other
branches (guest/tests.sh PENDING).  DH_VM_BENCH=1 runs guest/bench.sh after the tests
(instances through dindhelperd vs systemctl, DH_VM_BENCH_N instances, default 20; measured
on trixie under TCG with a loaded host: 37.9 s vs 40.9 s for 20, ratio 0.93).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from vm import Vm, GuestError  # noqa: E402

TEST_TIMEOUT = int(os.environ.get("DH_VM_TEST_TIMEOUT", "600"))


class Results:
    def __init__(self):
        self.passed, self.failed, self.names = 0, 0, []

    def record(self, name, ok, secs, output=""):
        if ok:
            self.passed += 1
            print(f"test {name} ... ok ({secs:.1f} s)", flush=True)
        else:
            self.failed += 1
            self.names.append(name)
            print(f"test {name} ... FAILED ({secs:.1f} s)", flush=True)
            for line in output.rstrip().splitlines()[-80:]:
                print(f"    {line}")
            sys.stdout.flush()


def build_image(suite):
    r = subprocess.run([os.path.join(HERE, "build-image.sh"), suite],
                       stdout=subprocess.PIPE, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not lines[-1].startswith("IMAGE "):
        raise GuestError(f"image build for {suite} failed (exit {r.returncode})")
    return lines[-1].split(" ", 1)[1]


def stage_payload(dest):
    """The release binaries and every file `make install` reads, plus the guest tests."""
    src = os.path.join(dest, "src")
    rel = os.path.join(src, "target/release")
    os.makedirs(rel)
    for b in ("dindhelperd", "dindhelperctl"):
        p = os.path.join(REPO, "target/release", b)
        if not os.path.exists(p):
            raise GuestError(f"{p} missing: cargo build --release --locked --bins")
        shutil.copy2(p, rel)
    for d in ("polkit", "dbus", "systemd"):
        shutil.copytree(os.path.join(REPO, d), os.path.join(src, d))
    for f in ("Makefile", "README.md"):
        shutil.copy2(os.path.join(REPO, f), src)
    shutil.copytree(os.path.join(HERE, "guest"), os.path.join(dest, "guest"))


def run_guest(suite, args, res):
    t0 = time.time()
    try:
        image = build_image(suite)
    except GuestError as e:
        res.record(f"{suite}/image", False, time.time() - t0, str(e))
        return
    print(f"{suite}: image {image} ready after {time.time() - t0:.1f} s", flush=True)
    payload = tempfile.mkdtemp(prefix=f"dh-vm-payload-{suite}-")
    try:
        stage_payload(payload)
        t1 = time.time()
        with Vm(image, payload_dir=payload, name=suite) as vm:
            try:
                print(f"{suite}: guest agent after {vm.boot_s:.1f} s", flush=True)
                rc, out, err = vm.sh("systemctl is-system-running --wait", timeout=600)
                ok = out.strip() == "running"
                if not ok:
                    _, f, _ = vm.sh("systemctl --failed --no-legend; journalctl -b -p err --no-pager | tail -30")
                    out += f
                res.record(f"{suite}/boot", ok, time.time() - t1,
                           f"is-system-running: {out}{err}")
                print(f"{suite}: system running after {time.time() - t1:.1f} s", flush=True)
                vm.check("mkdir -p /mnt/payload && mount -o ro,noload /dev/vdb /mnt/payload")
                rc, names, _ = vm.sh("bash /mnt/payload/guest/tests.sh --list default")
                tests = names.split()
                if args.with_pending:
                    tests += vm.check("bash /mnt/payload/guest/tests.sh --list pending").split()
                if args.only:
                    tests = [t for t in tests if any(s in t for s in args.only)]
                for t in tests:
                    ts = time.time()
                    try:
                        rc, out, err = vm.sh(f"bash /mnt/payload/guest/tests.sh {t}",
                                             timeout=TEST_TIMEOUT)
                    except GuestError as e:
                        rc, out, err = -1, "", str(e)
                    res.record(f"{suite}/{t}", rc == 0, time.time() - ts, out + err)
                    print(out if os.environ.get("DH_VM_VERBOSE") and rc == 0 else "", end="")
                if os.environ.get("DH_VM_BENCH"):
                    n = int(os.environ.get("DH_VM_BENCH_N", "20"))
                    ts = time.time()
                    rc, out, err = vm.sh(f"DH_VM_BENCH_N={n} bash /mnt/payload/guest/bench.sh",
                                         timeout=1200)
                    print(out + err, flush=True)
                    res.record(f"{suite}/bench", rc == 0, time.time() - ts, out + err)
                # the daemon's log, for the record
                _, log, _ = vm.sh("journalctl -u dindhelperd --no-pager -p warning | tail -20")
                if log.strip() and res.failed:
                    print(f"{suite}: dindhelperd warnings:\n{log}", flush=True)
                ts = time.time()
            except BaseException:
                print(f"{suite}: console (last lines):\n{vm.console_tail()}", flush=True)
                raise
        print(f"{suite}: shutdown {time.time() - ts:.1f} s; boot + tests {time.time() - t1:.1f} s; "
              f"guest total {time.time() - t0:.1f} s", flush=True)
    except GuestError as e:
        res.record(f"{suite}/vm", False, time.time() - t0, str(e))
    finally:
        shutil.rmtree(payload, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--guest", default="all", choices=["all", "trixie", "bookworm"])
    ap.add_argument("--with-pending", action="store_true",
                    default=os.environ.get("DH_VM_PENDING") == "1")
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args()
    suites = ["trixie", "bookworm"] if args.guest == "all" else [args.guest]
    res = Results()
    t0 = time.time()
    try:
        for s in suites:
            run_guest(s, args, res)
    except KeyboardInterrupt:
        print("interrupted: qemu stopped, temp files removed", flush=True)
        res.failed += 1
    cache = os.environ.get("DH_VM_CACHE", "/var/cache/dindhelper-vm")
    du = subprocess.run(["du", "-sh", cache], capture_output=True, text=True).stdout.split("\t")[0]
    print(f"VM suite wall time {time.time() - t0:.0f} s; cache {cache}: {du}")
    if res.names:
        print("failed: " + " ".join(res.names))
    print(f"{res.passed} passed, {res.failed} failed")
    sys.exit(1 if res.failed else 0)


if __name__ == "__main__":
    main()
