#!/bin/sh
# Runs inside the guest root (mmdebstrap customize hook) once per image build.
set -e
echo dhvm > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 dhvm\n' > /etc/hosts
# a fixed machine-id: no first-boot logic (systemd-firstboot would prompt on the console)
echo 5d0ab1e6f6b34ad3a3e0c2bd1b2c7f10 > /etc/machine-id
mkdir -p /var/lib/dbus && ln -sf /etc/machine-id /var/lib/dbus/machine-id
printf '/dev/vda / ext4 rw,noatime 0 0\n' > /etc/fstab
passwd -d root
# units a test VM does not need and that only cost boot time
for u in systemd-firstboot.service apt-daily.timer apt-daily-upgrade.timer \
         e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer dpkg-db-backup.timer \
         getty@tty1.service serial-getty@ttyS0.service systemd-timesyncd.service; do
  ln -sf /dev/null /etc/systemd/system/$u
done
systemctl enable docker.service containerd.service >/dev/null 2>&1 || true
# test users: dhmember joins group dindhelper after `make install` created it; dhplain never
useradd -m -s /bin/bash dhmember
useradd -m -s /bin/bash dhplain
# a container image without a registry: static busybox as a rootfs tarball (docker import)
mkdir -p /opt/bbimg/bin /opt/bbimg/tmp /opt/bbimg/www
cp /bin/busybox /opt/bbimg/bin/busybox
for a in sh ls cat echo sleep id uname true httpd nc head tr dd seq wget timeout kill; do
  ln -sf busybox /opt/bbimg/bin/$a
done
echo dindhelper-vm-ok > /opt/bbimg/www/index.html
tar -C /opt/bbimg -cf /opt/busybox-rootfs.tar . && rm -rf /opt/bbimg
apt-get clean
rm -rf /var/lib/apt/lists/*
