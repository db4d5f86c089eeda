#!/usr/bin/env bash
# Builds a shoal netboot image from Debian packages: the Debian kernel (linux-image-amd64) and an
# initramfs holding busybox (busybox-static), smartctl (smartmontools), mkfs.ext4 (e2fsprogs) and
# mkfs.xfs (xfsprogs) for the drives the agent prepares, restic for backup tasks, the NIC, disk and
# filesystem modules a node needs, the shoal agent, and an init that brings the network up by DHCP and starts the agent with the
# controller address and join token from the kernel command line (shoal.controller=, shoal.token=).
#
# Usage: images/build.sh --out DIR --version V [--agent PATH] [--key PATH] [--modules "m1 m2 ..."]
#                        [--health-check FILE] [--agent-args "ARGS"] [--trust-key PUB]...
#
# The image trusts the public half of its signing key for kexec: it is baked in as
# /etc/shoal/image-keys/signing-key.pub and the agent starts with --image-key for every key there, so
# a node running this image kexecs only into images signed by that key (an image the controller names
# that does not verify is refused, and so is the reboot into it). --trust-key PUB (repeatable) bakes
# more keys in: build one image trusting the old and the new key to move a fleet to a new signing key.
#
# --health-check FILE bakes FILE into the image as /etc/shoal/health-check (mode 0755); the init then
# starts the agent with --health-check /etc/shoal/health-check, so the agent's boot report (and the
# image rollout waiting for it) includes that check. Tests use it to build an image that never
# becomes healthy. --agent-args adds arguments to the agent's command line (e.g. --no-kexec).
#
# Writes DIR/{vmlinuz,initrd.img,manifest.json,manifest.sig,signing-key.pub}. manifest.sig is a raw
# Ed25519 signature of manifest.json by the key at --key (default
# ${XDG_CONFIG_HOME:-~/.config}/shoal/image-signing.pem, generated if absent; its public half is
# written beside it as image-signing.pub, 64 hex characters: give that file to
# `shoal-controller serve --image-key`).
#
# Reproducible: the same inputs (package versions, agent binary, version, SOURCE_DATE_EPOCH) give the
# same kernel and initramfs bytes: files are sorted, owned by 0:0, stamped with SOURCE_DATE_EPOCH
# (default: the last commit's time), and compressed with single-threaded zstd. The signature is
# deterministic too (Ed25519), for the same key.
#
# Needs (Debian): linux-image-amd64 busybox-static smartmontools restic e2fsprogs xfsprogs cpio zstd openssl kmod
# binutils.
set -euo pipefail

out="" version="" agent="" health_check="" agent_args="" key="${XDG_CONFIG_HOME:-$HOME/.config}/shoal/image-signing.pem"
trust_keys=()
# NICs and disk controllers; crc32c_generic before the filesystems, whose metadata checksums ask the crypto
# API for "crc32c" (the image has no modprobe to load it on demand). PCIe hot-plug (pciehp, acpiphp) is
# built into Debian's kernel.
modules="virtio_net virtio_pci e1000 e1000e igb r8169 ahci nvme sd_mod virtio_blk crc32c_generic ext4 xfs"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        --agent) agent="$2"; shift 2 ;;
        --key) key="$2"; shift 2 ;;
        --modules) modules="$2"; shift 2 ;;
        --health-check) health_check="$2"; shift 2 ;;
        --agent-args) agent_args="$2"; shift 2 ;;
        --trust-key) trust_keys+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] && [ -n "$version" ] || { echo "usage: images/build.sh --out DIR --version V [--agent PATH] [--key PATH]" >&2; exit 2; }
case "$version" in *[!A-Za-z0-9.+_-]*|.*) echo "build.sh: version may only hold letters, digits, . + _ -" >&2; exit 2 ;; esac

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
started=$(date +%s.%N)
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)}"
export LC_ALL=C TZ=UTC

if [ -z "$agent" ]; then
    (cd "$repo" && cargo build --release -p shoal-agent >&2)
    agent="$repo/target/release/shoal-agent"
fi
[ -x "$agent" ] || { echo "build.sh: agent binary $agent not found" >&2; exit 1; }
[ -z "$health_check" ] || [ -r "$health_check" ] || { echo "build.sh: health check $health_check not readable" >&2; exit 1; }
for k in ${trust_keys[@]+"${trust_keys[@]}"}; do
    grep -qE '^[0-9a-f]{64}$' "$k" 2>/dev/null || { echo "build.sh: --trust-key $k is not a .pub of 64 hex characters" >&2; exit 1; }
done

# Signing key: generated once, kept outside the image; its public half goes into the image too.
if [ ! -f "$key" ]; then
    mkdir -p "$(dirname "$key")"
    (umask 077 && openssl genpkey -algorithm ed25519 -out "$key")
    echo "build.sh: generated image signing key $key" >&2
fi
pub="${key%.pem}.pub"
openssl pkey -in "$key" -pubout -outform DER | tail -c 32 | od -An -tx1 | tr -d ' \n' > "$pub"
echo >> "$pub"

# The kernel package linux-image-amd64 points at.
kpkg=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | tr ',|' '\n\n' | sed 's/ (.*//; s/ //g' | grep '^linux-image-[0-9]' | head -1)
kver=${kpkg#linux-image-}
kernel="/boot/vmlinuz-$kver"
[ -r "$kernel" ] || { echo "build.sh: $kernel missing: apt-get install linux-image-amd64" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc/shoal,proc,sys,dev,run,tmp,var/lib/shoal-agent,usr/bin,usr/sbin,usr/share/udhcpc,lib/modules,lib64,root}

# Userland: busybox, smartctl, mkfs for the filesystems the agent prepares drives with, restic for
# backup tasks (a static Go binary), the agent; shared
# libraries as ldd lists them. mke2fs picks the filesystem from its name, so it is copied as mkfs.ext4.
cp /bin/busybox "$root/bin/busybox"
tools="/usr/sbin/smartctl /sbin/mke2fs:/usr/sbin/mkfs.ext4 /sbin/mkfs.xfs:/usr/sbin/mkfs.xfs /usr/bin/restic"
for t in $tools; do
    src="${t%%:*}" dst="${t#*:}"
    [ -x "$src" ] || { echo "build.sh: $src missing (scripts/deps)" >&2; exit 1; }
    cp "$src" "$root$dst"
done
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
objcopy --strip-all "$agent" "$root/usr/bin/shoal-agent"
libs=$(for f in "$root/usr/bin/shoal-agent" "$root"/usr/sbin/*; do ldd "$f"; done | grep -o '/[^ ]*' | sort -u)
for lib in $libs; do
    real=$(readlink -f "$lib")
    mkdir -p "$root$(dirname "$lib")"
    cp "$real" "$root$lib"
done

# Kernel modules, dependencies first, in a list the init loads with insmod.
moddir="/lib/modules/$kver"
declare -A seen=()
order=()
add_module() {
    local path="$1" dep
    [ -n "${seen[$path]:-}" ] && return
    seen[$path]=1
    for dep in $(grep "^$path:" "$moddir/modules.dep" | cut -d: -f2); do add_module "$dep"; done
    order+=("$path")
}
for m in $modules; do
    path=$(awk -F: -v m="$m" '{ n=$1; sub(".*/", "", n); sub("\\.ko.*", "", n); gsub("-", "_", n); if (n == m) { print $1; exit } }' "$moddir/modules.dep")
    [ -n "$path" ] || { echo "build.sh: module $m not in $kver" >&2; exit 1; }
    add_module "$path"
done
for path in "${order[@]}"; do
    mkdir -p "$root/lib/modules/$(dirname "$path")"
    cp "$moddir/$path" "$root/lib/modules/$path"
done
printf '%s\n' "${order[@]}" > "$root/etc/shoal/modules"

cat > "$root/etc/os-release" <<EOF
NAME="shoal netboot"
ID=shoal-netboot
VERSION_ID="$version"
PRETTY_NAME="shoal netboot image $version"
EOF
echo "$version" > "$root/etc/shoal-image"
printf '%s\n' "$agent_args" > "$root/etc/shoal/agent-args"
if [ -n "$health_check" ]; then
    cp "$health_check" "$root/etc/shoal/health-check"
    chmod 0755 "$root/etc/shoal/health-check"
fi
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
mkdir -p "$root/etc/shoal/image-keys"
cp "$pub" "$root/etc/shoal/image-keys/signing-key.pub"
i=0
for k in ${trust_keys[@]+"${trust_keys[@]}"}; do
    i=$((i + 1))
    cp "$k" "$root/etc/shoal/image-keys/trusted-$i.pub"
done

cat > "$root/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
# udhcpc hook: configure the interface from the lease.
case "$1" in
    deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        if [ -n "$router" ]; then ip route replace default via "${router%% *}" dev "$interface"; fi
        : > /etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
        ;;
esac
exit 0
EOF

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
# shoal netboot init: modules, network by DHCP, then the agent with the controller address and the
# join token from the kernel command line.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
log() { echo "shoal-init[$(cut -d' ' -f1 /proc/uptime)]: $*" > /dev/console; }
log "image $(cat /etc/shoal-image) starting"
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /etc/shoal/modules
controller="" token=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        shoal.controller=*) controller="${arg#*=}" ;;
        shoal.token=*) token="${arg#*=}" ;;
    esac
done
ip link set lo up
up=""
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    for dev in /sys/class/net/*; do
        n="${dev##*/}"
        [ "$n" = lo ] && continue
        ip link set "$n" up
        if udhcpc -i "$n" -s /usr/share/udhcpc/default.script -t 4 -T 2 -n -q >/dev/null 2>&1; then
            up="$n"; break 2
        fi
    done
done
mac=$(cat "/sys/class/net/${up:-lo}/address" 2>/dev/null | tr -d :)
hostname "shoal-${mac:-node}"
log "network ${up:-down}: $(ip -4 -o addr show dev "${up:-lo}" | awk '{print $4}')"
if [ -z "$controller" ]; then
    log "no shoal.controller= on the kernel command line; dropping to a shell"
    exec sh
fi
check=""
[ -x /etc/shoal/health-check ] && check=/etc/shoal/health-check
# The keys images must be signed with for this node to kexec into them.
keys=""
for k in /etc/shoal/image-keys/*.pub; do
    [ -r "$k" ] && keys="$keys --image-key $k"
done
log "agent starting for controller $controller${check:+ with health check $check}"
while true; do
    # shellcheck disable=SC2046,SC2086 # the extra arguments and keys are words
    shoal-agent --controller "$controller" ${token:+--token "$token"} --state-dir /var/lib/shoal-agent ${check:+--health-check "$check"} $keys $(cat /etc/shoal/agent-args)
    log "agent exited ($?); restarting in 5 s"
    sleep 5
done
EOF
chmod 0755 "$root/init" "$root/usr/share/udhcpc/default.script"

mkdir -p "$out"
find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$root" && find . -mindepth 1 | sort | cpio --quiet -o -H newc --reproducible --owner=0:0) | zstd -q -15 -T1 > "$out/initrd.img"
cp "$kernel" "$out/vmlinuz"

cp "$pub" "$out/signing-key.pub"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
pkgver() { dpkg-query -W -f='${Version}' "$1"; }
inputs=""
for p in "$kpkg" busybox-static smartmontools restic e2fsprogs libext2fs2 libcom-err2 libblkid1 libuuid1 xfsprogs libinih1 \
    liburcu8 libc6 libgcc-s1 libstdc++6 libcap-ng0 libselinux1 libsystemd0; do
    v=$(pkgver "$p" 2>/dev/null) || continue
    inputs="$inputs    {\"name\": \"$p\", \"version\": \"$v\"},
"
done
inputs="$inputs    {\"name\": \"shoal-agent\", \"version\": \"sha256:$(sha "$root/usr/bin/shoal-agent")\"}"
if [ -n "$health_check" ]; then
    inputs="$inputs,
    {\"name\": \"health-check\", \"version\": \"sha256:$(sha "$root/etc/shoal/health-check")\"}"
fi
cat > "$out/manifest.json" <<EOF
{
  "format": 1,
  "version": "$version",
  "kernel": {"file": "vmlinuz", "size": $(size "$out/vmlinuz"), "sha256": "$(sha "$out/vmlinuz")"},
  "initrd": {"file": "initrd.img", "size": $(size "$out/initrd.img"), "sha256": "$(sha "$out/initrd.img")"},
  "cmdline": "console=tty0 console=ttyS0 panic=10",
  "inputs": [
$inputs
  ],
  "built_at": "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
openssl pkeyutl -sign -inkey "$key" -rawin -in "$out/manifest.json" -out "$out/manifest.sig"

elapsed=$(echo "$(date +%s.%N) - $started" | bc 2>/dev/null || echo "?")
echo "build.sh: image $version in $out: kernel $(size "$out/vmlinuz") bytes, initramfs $(size "$out/initrd.img") bytes ($(du -sk "$root" | cut -f1) KiB unpacked), ${elapsed}s" >&2
