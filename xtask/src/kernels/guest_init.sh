#!/bin/busybox sh
# The guest's /init (busybox, from the initramfs that `cargo xtask test
# --kernel` builds). It mounts the host's root read-only over 9p with a
# writable tmpfs overlay, the run's output directory writable at /tmp/out,
# the guest kernel's modules, then runs /tmp/out/run.sh as root in that root
# and powers off. The host reads `GUEST-RC: n` from the console.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Modules the root file system needs before it exists; the rest are loaded on
# demand by /sbin/modprobe below, from the kernel package's own tree.
for m in $(cat /mods/order); do
  insmod /mods/$m || echo "GUEST: insmod $m failed"
done
arg() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" /proc/cmdline; }
KDIR=$(arg kdir)
mkdir -p /lower /rw
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower || echo "GUEST: 9p mount of the host root failed"
mount -t tmpfs rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,index=off,metacopy=off overlay /mnt || echo "GUEST: overlay failed"
mount -t proc proc /mnt/proc
mount -t sysfs sys /mnt/sys
mount -t devtmpfs dev /mnt/dev
mount -t tmpfs run /mnt/run
mount -t tmpfs tmp /mnt/tmp
mount -t cgroup2 cgroup2 /mnt/sys/fs/cgroup
mount -t bpf bpf /mnt/sys/fs/bpf
mkdir -p /mnt/tmp/out
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /mnt/tmp/out || echo "GUEST: 9p mount of the output directory failed"
V=$(uname -r)
mkdir -p /mnt/lib/modules/$V
mount --bind /mnt$KDIR/lib/modules/$V /mnt/lib/modules/$V
# The kernel asks /sbin/modprobe (in this, init's, root) for modules such as
# veth or bridge when a test needs them: answer from the chroot's kmod.
mkdir -p /sbin
printf '#!/bin/sh\nexec /bin/chroot /mnt /sbin/modprobe "$@"\n' > /sbin/modprobe
chmod +x /sbin/modprobe
echo /sbin/modprobe > /proc/sys/kernel/modprobe
ip link set lo up
echo "GUEST: $V nproc=$(nproc) uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot /mnt /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root CI=true /bin/sh /tmp/out/run.sh
RC=$?
dmesg > /mnt/tmp/out/dmesg.txt
echo "GUEST-RC: $RC"
sync
poweroff -f
