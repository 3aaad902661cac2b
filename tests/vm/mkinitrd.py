#!/usr/bin/env python3
"""Build a tiny busybox initramfs (newc cpio, uncompressed) for a Debian kernel.

usage: mkinitrd.py MODULES_ROOT KVER OUT.cpio MODULE...

MODULES_ROOT holds lib/modules/KVER with a modules.dep (dpkg-deb -x of a linux-image
package, then `depmod -b`). The listed modules and their dependency closure are
decompressed (Debian ships .ko.xz) and insmod-ed by /init in dependency order; /init then
mounts root= (ext4) and switch_roots to /sbin/init. The host's busybox must be static
(busybox-static).
"""
import lzma
import os
import subprocess
import sys


def closure(mdir, wanted):
    dep, byname = {}, {}
    for line in open(os.path.join(mdir, "modules.dep")):
        path, _, rest = line.partition(":")
        path = path.strip()
        dep[path] = rest.split()
        byname[os.path.basename(path).split(".ko")[0].replace("-", "_")] = path
    builtin = set()
    bpath = os.path.join(mdir, "modules.builtin")
    if os.path.exists(bpath):
        for line in open(bpath):
            builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
    order, seen = [], set()

    def visit(p):
        if p in seen:
            return
        seen.add(p)
        for d in dep.get(p, []):
            visit(d)
        order.append(p)

    for w in wanted:
        k = w.replace("-", "_")
        if k in builtin:
            continue
        if k not in byname:
            sys.exit(f"mkinitrd: module {w} neither built in nor in modules.dep")
        visit(byname[k])
    return order


class Cpio:
    """newc writer: enough for regular files, directories and symlinks."""

    def __init__(self, f):
        self.f, self.ino = f, 1

    def add(self, name, mode, data=b""):
        self.ino += 1
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
        self.f.write(hdr.encode() + name_b)
        self.f.write(b"\0" * ((4 - (110 + len(name_b)) % 4) % 4))
        self.f.write(data)
        self.f.write(b"\0" * ((4 - len(data) % 4) % 4))

    def trailer(self):
        self.add("TRAILER!!!", 0)


INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/mods/*.ko; do insmod $m 2>/dev/null || echo "initrd: insmod $m failed"; done
root=/dev/vda
for r in $(cat /proc/cmdline); do case $r in root=*) root=${r#root=};; esac; done
i=0; while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
  echo "DH-INITRD-ERROR: cannot mount $root"
  poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev || umount /dev
exec switch_root /newroot /sbin/init
"""


def main():
    modroot, kver, out, *wanted = sys.argv[1:]
    mdir = os.path.join(modroot, "lib/modules", kver)
    order = closure(mdir, wanted)
    with open(out + ".tmp", "wb") as f:
        c = Cpio(f)
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/mods", "tmp", "run"]:
            c.add(d, 0o040755)
        c.add("bin/busybox", 0o100755, open("/bin/busybox", "rb").read())
        for app in ["sh", "mount", "umount", "insmod", "switch_root", "poweroff", "cat",
                    "echo", "sleep", "grep"]:
            c.add(f"bin/{app}", 0o120777, b"busybox")
        for i, p in enumerate(order):
            src = os.path.join(mdir, p)
            data = open(src, "rb").read()
            if p.endswith(".xz"):
                data = lzma.decompress(data)
            elif p.endswith(".zst"):
                data = subprocess.run(["zstd", "-dc", src], check=True,
                                      capture_output=True).stdout
            name = f"{i:03d}_" + os.path.basename(p).split(".ko")[0] + ".ko"
            c.add(f"lib/mods/{name}", 0o100644, data)
        c.add("init", 0o100755, INIT.encode())
        c.trailer()
    os.rename(out + ".tmp", out)
    print(f"mkinitrd: {out}: {len(order)} modules", file=sys.stderr)


if __name__ == "__main__":
    main()
