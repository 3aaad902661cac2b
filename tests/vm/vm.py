#!/usr/bin/env python3
"""One qemu guest for the VM suite: boot, command channel, files in, clean shutdown.

    with Vm(image_dir, payload_dir=...) as vm:     # boots, waits for the guest agent
        rc, out, err = vm.sh("systemctl is-system-running --wait", timeout=300)
        vm.put("/root/x", b"...")
    # leaving the block: guest-shutdown, wait for qemu; on any error or Ctrl-C qemu is
    # killed by pid and the temp dir (agent socket, console log, payload disk) removed.

CLI: vm.py warm IMAGE_DIR   one persistent boot of a freshly built image (see build-image.sh)

What was learned booting Debian guests on this machine kind (2 cores shared by 8 agents):
- /dev/kvm opens but the host's KVM is PVM (/sys/module/kvm_pvm): stock Debian kernels fail
  in its instruction emulator or run ~100x slower than TCG.  Accel is TCG
  (`-accel tcg,thread=multi,tb-size=256`) unless KVM is there and not PVM (DH_VM_ACCEL=kvm|tcg
  forces one).
- `-cpu qemu64` + `mitigations=off` boots faster under TCG than `-cpu max`.  qemu64 has no
  SSE4.2: the initramfs must carry crc32c_generic for ext4.
- Boot to guest agent 16-21 s, to `is-system-running` 30-45 s on an idle host (recipe);
  measured here with the other agents compiling (load 8-18): agent 42-108 s, running 84-240 s
  with one qemu, up to 620 s with three qemus at once.  Nothing in the suite has a fixed
  sleep tied to boot speed: waits are `is-system-running --wait` and polls.  qemu RSS
  ~0.9 GB with -m 1536.  Guest user space runs 7-25x slower than the host; `docker run`
  takes 3-6 s; `systemctl restart docker` with a running container ~60 s.
- A CPU quota is still measurable under TCG on a loaded host: a hog under CPUQuota=20%
  used 20.1 % (trixie) and 20.2 % (bookworm) of guest wall time over 8 s: the guest clock
  follows host time and throttling happens inside the guest kernel.
- qemu-guest-agent's virtio-serial socket serves one client at a time, and guest-exec returns
  output only when the process ends: one connection for the whole run, output of a test
  arrives in one piece.  guest-exec-status output is capped (~16 MB base64): tests print little.
- qemu is started directly (no wrapper), in its own process group (a terminal Ctrl-C reaches
  only this harness, which then stops it), with PR_SET_PDEATHSIG=SIGKILL so it cannot outlive
  a harness that is itself killed.
- Bulk files (release binaries, system files) go in on a second, read-only virtio disk made
  with `mkfs.ext4 -d` (one step, no size limit); small files through guest-file-write.
"""
import base64
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

MEM_MB = int(os.environ.get("DH_VM_MEM", "1536"))   # the brief: guest RAM <= 2 GiB
SMP = os.environ.get("DH_VM_SMP", "2")


def accel_args():
    want = os.environ.get("DH_VM_ACCEL", "auto")
    if want == "auto":
        kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK) and not os.path.exists("/sys/module/kvm_pvm")
        want = "kvm" if kvm_ok else "tcg"
    if want == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi,tb-size=256", "-cpu", "qemu64"]


class GuestError(Exception):
    pass


class Qga:
    """qemu-guest-agent client over the virtio-serial unix socket (JSON lines)."""

    def __init__(self, path):
        self.path, self.s, self.buf = path, None, b""

    def _connect(self):
        if self.s:
            self.s.close()
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.connect(self.path)
        self.buf = b""

    def _recv(self, timeout):
        self.s.settimeout(timeout)
        while True:
            self.buf = self.buf.lstrip(b"\xff")   # guest-sync-delimited's marker
            if b"\n" in self.buf:
                line, _, self.buf = self.buf.partition(b"\n")
                if line.strip():
                    return json.loads(line)
                continue
            d = self.s.recv(1 << 20)
            if not d:
                raise ConnectionError("guest agent socket closed")
            self.buf += d

    def _sync(self, timeout):
        tok = random.randint(1, 2**31)
        self.s.sendall(b"\xff" + json.dumps(
            {"execute": "guest-sync-delimited", "arguments": {"id": tok}}).encode() + b"\n")
        while self._recv(timeout).get("return") != tok:
            pass

    def wait_ready(self, timeout, alive):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if not alive():
                raise GuestError("qemu exited before the guest agent answered")
            try:
                self._connect()
                self._sync(2.0)
                return time.time() - t0
            except (OSError, ConnectionError, ValueError):
                time.sleep(0.5)
        raise GuestError(f"guest agent did not answer within {timeout} s")

    def call(self, cmd, args=None, timeout=60):
        msg = {"execute": cmd}
        if args is not None:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        r = self._recv(timeout)
        if "error" in r:
            raise GuestError(f"{cmd}: {r['error']}")
        return r.get("return")


def _pdeathsig():
    os.setpgid(0, 0)
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Vm:
    def __init__(self, image_dir, payload_dir=None, persist=False, name="guest"):
        self.image_dir, self.payload_dir, self.persist, self.name = \
            image_dir, payload_dir, persist, name
        self.proc, self.tmp, self.qga = None, None, None
        self.boot_s = None

    # --- lifecycle ---------------------------------------------------------------------
    def __enter__(self):
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            self.start()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, et, ev, tb):
        try:
            if et is None:
                self.shutdown()
        finally:
            self.kill()
            for s, h in self._old.items():
                signal.signal(s, h)
        return False

    @staticmethod
    def _on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix=f"dh-vm-{self.name}-")
        sock = os.path.join(self.tmp, "qga.sock")
        self.console = os.path.join(self.tmp, "console.log")
        d = self.image_dir
        drive = f"file={d}/rootfs.ext4,if=virtio,format=raw,cache=unsafe"
        if not self.persist:
            drive += ",snapshot=on"
        cmd = ["qemu-system-x86_64", *accel_args(), "-machine", "q35", "-smp", SMP,
               "-m", str(MEM_MB), "-display", "none", "-monitor", "none", "-no-reboot",
               "-nic", "none", "-serial", f"file:{self.console}",
               "-kernel", f"{d}/vmlinuz", "-initrd", f"{d}/initrd.cpio",
               "-append", "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 "
                          "panic=-1 mitigations=off systemd.show_status=false",
               "-drive", drive,
               "-chardev", f"socket,path={sock},server=on,wait=off,id=qga0",
               "-device", "virtio-serial-pci",
               "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]
        if self.payload_dir:
            img = os.path.join(self.tmp, "payload.ext4")
            size_mb = 64 + du_mb(self.payload_dir) * 2
            subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "dhpayload",
                            "-d", self.payload_dir, img, f"{size_mb}M"], check=True)
            cmd += ["-drive", f"file={img},if=virtio,format=raw,readonly=on"]
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
        self.qga = Qga(sock)
        self.boot_s = self.qga.wait_ready(float(os.environ.get("DH_VM_BOOT_TIMEOUT", "600")),
                                          lambda: self.proc.poll() is None)

    def shutdown(self, timeout=120):
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            self.qga.s.sendall(json.dumps({"execute": "guest-shutdown",
                                           "arguments": {"mode": "powerdown"}}).encode() + b"\n")
        except OSError:
            pass
        self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.qga and self.qga.s:
            self.qga.s.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def console_tail(self, n=40):
        try:
            return "".join(open(self.console, errors="replace").readlines()[-n:])
        except OSError:
            return ""

    # --- commands and files --------------------------------------------------------------
    def sh(self, command, timeout=300, stdin=None):
        """Run bash -c COMMAND as root in the guest: (exit code, stdout, stderr)."""
        args = {"path": "/bin/bash", "arg": ["-c", command], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = self.qga.call("guest-exec", args)["pid"]
        t0, delay = time.time(), 0.005
        while True:
            st = self.qga.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                code = st.get("exitcode", 128 + st.get("signal", 0))
                return code, out, err
            if time.time() - t0 > timeout:
                self.qga.call("guest-exec", {"path": "/bin/kill", "arg": ["-9", str(pid)]})
                raise GuestError(f"timeout after {timeout} s: {command[:200]}")
            if self.proc.poll() is not None:
                raise GuestError("qemu exited")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def check(self, command, timeout=300):
        rc, out, err = self.sh(command, timeout)
        if rc != 0:
            raise GuestError(f"`{command[:200]}` exited {rc}\n{out}{err}")
        return out

    def put(self, path, data, mode=0o644):
        h = self.qga.call("guest-file-open", {"path": path, "mode": "wb"})
        try:
            for i in range(0, len(data), 48 * 1024):
                self.qga.call("guest-file-write", {
                    "handle": h, "buf-b64": base64.b64encode(data[i:i + 48 * 1024]).decode()})
        finally:
            self.qga.call("guest-file-close", {"handle": h})
        self.check(f"chmod {mode:o} '{path}'")


def du_mb(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total // (1 << 20) + 1


def warm(image_dir):
    """One persistent boot: AppArmor compiles its cache, dockerd initialises /var/lib/docker,
    the busybox image is imported; then the journal is emptied and the guest powers off."""
    with Vm(image_dir, persist=True, name="warm") as vm:
        print(f"warm: agent after {vm.boot_s:.1f} s", flush=True)
        rc, out, _ = vm.sh("systemctl is-system-running --wait", timeout=600)
        print(f"warm: is-system-running {out.strip()} after {time.time() - vm.t0:.1f} s", flush=True)
        for c in ["docker import /opt/busybox-rootfs.tar bb:latest >/dev/null",
                  "docker run --rm --network none bb true",
                  "journalctl --rotate >/dev/null 2>&1; journalctl --vacuum-time=1s >/dev/null 2>&1; sync"]:
            vm.check(c, timeout=600)
        print(f"warm: done after {time.time() - vm.t0:.1f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "warm":
        warm(sys.argv[2])
    else:
        sys.exit("usage: vm.py warm IMAGE_DIR")
