#!/usr/bin/env bash
# Builds the m365-sensor appliance image of one target (image/targets/<target>.conf):
#
#   image/build.sh TARGET [OUTDIR]          e.g. image/build.sh x86_64-vm image/out/x86_64
#
# Without Docker, loop devices or mounts (image/LAYOUT.md is the partition plan):
#   1. root tree: mmdebstrap (bookworm minbase + the target's packages), CACHED as a tarball (below);
#   2. the agent: the .deb of dist/bin/m365-sensor-<arch> (dist/deb/build-deb.sh) installed with dpkg --root;
#      image/rootfs/ copied over the tree; units enabled; hardening applied and CHECKED (no compiler, no
#      SSH server, no package caches or docs, root locked, the agent unit's exposure <= 2.0);
#   3. slot images: erofs root (lz4hc), its dm-verity hash tree, a vfat boot partition holding the slot's
#      two unified kernel images (systemd-stub + kernel + initramfs + command line with the root hash);
#   4. disk: ESP (GRUB, the slot chooser, at the removable-media path), the slot A images, an empty slot B,
#      the ext4 data partition (/var), a GPT written by sfdisk onto a plain file;
#   5. outputs in OUTDIR: m365-sensor-<target>.{raw,qcow2,vmdk,vhdx}, each with a .sha256, manifest.txt
#      (image, agent and kernel versions, root hash, every package with its version), and slot/ (the
#      slot images that image/bundle.sh packs into a signed RAUC bundle).
#
# The cache: /var/cache/m365-sensor-image/rootfs-<deb arch>-<key>.tar (outside the work tree, so that every
# clone on the machine, CI's included, shares it), where <key> is the first 16 hex digits of the SHA-256
# of: the cache format version, suite, architecture, components, the sorted package list, the boot files
# package (GRUB) and the stub package, the host's apt sources file, and the content of
# image/rootfs/etc/initramfs-tools (the initramfs is built inside the cached tree). A tarball older than
# IMAGE_CACHE_MAX_AGE_DAYS (default 7) is rebuilt, so that security updates reach the image; IMAGE_CACHE=0
# bypasses the cache.
#
# Environment: IMAGE_CACHE_DIR (default /var/cache/m365-sensor-image), IMAGE_CACHE_MAX_AGE_DAYS, IMAGE_CACHE=0,
# RAUC_KEYS_DIR (default image/out/keys: the test signing key, generated when missing; kept out of git),
# SOURCE_DATE_EPOCH, IMAGE_OUTPUTS, KEEP_WORK=1 (keep OUTDIR/work), M365_BROKEN_AGENT=1 (test rig only: the agent binary
# is replaced by one that fails, to test rollback; never for a release),
# IMAGE_MIN_VERSION (the version floor: no bundle below it ever installs on this image, whatever the
# downgrade switch; default the agent's version, so that no older release comes back),
# IMAGE_ALLOW_DOWNGRADE=1 (the downgrade switch in the read-only image: /usr/lib/m365-sensor/allow-downgrade;
# default off, and the backend can never set it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 TARGET [OUTDIR]"
TARGET=$1
[ -f "$IMAGE_DIR/targets/$TARGET.conf" ] || die "no target '$TARGET' (image/targets/*.conf)"
source "$IMAGE_DIR/targets/common.conf"
source "$IMAGE_DIR/targets/$TARGET.conf"
# IMAGE_OUTPUTS="qcow2 vmdk" (or "none") overrides the target's formats besides raw.
if [ -n "${IMAGE_OUTPUTS:-}" ]; then read -ra OUTPUTS <<< "${IMAGE_OUTPUTS//none/}"; fi
REPO=$(cd "$IMAGE_DIR/.." && pwd)
OUT=$(mkdir -p "${2:-$IMAGE_DIR/out/$TARGET}" && cd "${2:-$IMAGE_DIR/out/$TARGET}" && pwd)
WORK=$OUT/work
WORK_HOOKS=$OUT/hooks
CACHE_DIR=${IMAGE_CACHE_DIR:-/var/cache/m365-sensor-image}
KEYS=${RAUC_KEYS_DIR:-$IMAGE_DIR/out/keys}
EPOCH=${SOURCE_DATE_EPOCH:-$(date +%s)}
MAX_EXPOSURE=2.0
SERVICE_UID=990 # fixed, so that both slots agree on the owner of /var/lib/m365-sensor
T0=$(date +%s.%N)
TIMES=()
step() { note "[$TARGET] $*"; }
timed() { TIMES+=("$1 $(elapsed "$2")"); }

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap, dpkg --root, file ownership in the tree)"
for c in mmdebstrap mkfs.erofs veritysetup sfdisk mkfs.vfat mmd mcopy mke2fs qemu-img grub-mkimage \
    grub-editenv openssl dpkg-deb "$OBJCOPY" "${OBJCOPY%objcopy}objdump" python3 systemd-analyze; do
    command -v "$c" >/dev/null || die "$c not found: run image/host-deps.sh"
done
if [ "$ARCH" != "$(uname -m)" ] && [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$ARCH" ]; then
    die "qemu-$ARCH is not registered in binfmt_misc: run image/host-deps.sh"
fi

# ---- the agent ---------------------------------------------------------------------------------------
BIN=$REPO/dist/bin/m365-sensor-$ARCH
[ -x "$BIN" ] || die "$BIN missing: run 'make dist' first"
AGENT_VERSION=${VERSION:-$("$BIN" --version 2>/dev/null | sed -n 's/^m365-sensor \([0-9][^ ]*\)$/\1/p')}
[ -n "$AGENT_VERSION" ] || die "cannot read the agent's version from $BIN --version (set VERSION=X.Y.Z)"
IMAGE_VERSION="$AGENT_VERSION+$(date -u -d "@$EPOCH" +%Y%m%d%H%M%S)"
[ -n "${M365_BROKEN_AGENT:-}" ] && IMAGE_VERSION="$IMAGE_VERSION.broken"
MIN_VERSION=${IMAGE_MIN_VERSION:-$AGENT_VERSION}
printf '%s' "$MIN_VERSION" | grep -qxE '[0-9A-Za-z.+~_-]{1,64}' || die "IMAGE_MIN_VERSION '$MIN_VERSION': not a version"

# ---- signing key (the image's RAUC keyring) -----------------------------------------------------------
if [ ! -f "$KEYS/signing.key.pem" ] || [ ! -f "$KEYS/signing.cert.pem" ]; then
    step "generating a TEST update signing key in $KEYS (not for production: set RAUC_KEYS_DIR)"
    mkdir -p "$KEYS" && chmod 700 "$KEYS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -subj "/O=m365-sensor/CN=m365-sensor test update signing" \
        -keyout "$KEYS/signing.key.pem" -out "$KEYS/signing.cert.pem" 2>/dev/null
    chmod 600 "$KEYS/signing.key.pem"
fi

# ---- 1. root tree (cached) ----------------------------------------------------------------------------
t=$(date +%s.%N)
mapfile -t PACKAGES < <(printf '%s\n' "${BASE_PACKAGES[@]}" "${KERNEL_PACKAGES[@]}" "${EXTRA_PACKAGES[@]}" | sort -u)
[ -f "$HOST_SOURCES" ] || die "$HOST_SOURCES: no apt sources (set HOST_SOURCES)"
KEY=$(
    {
        echo "cache-format 1"
        echo "$SUITE $DEB_ARCH $COMPONENTS"
        printf '%s\n' "${PACKAGES[@]}"
        echo "$GRUB_PACKAGE systemd-boot-efi"
        cat "$HOST_SOURCES"
        (cd "$IMAGE_DIR/rootfs/etc/initramfs-tools" && find . -type f | LC_ALL=C sort | xargs sha256sum)
        echo "initramfs-modules ${INITRAMFS_MODULES[*]}"
    } | sha256sum | cut -c1-16
)
TARBALL=$CACHE_DIR/rootfs-$DEB_ARCH-$KEY.tar
mkdir -p "$CACHE_DIR"
if [ "${IMAGE_CACHE:-1}" != 0 ] && [ -f "$TARBALL" ] &&
    [ -z "$(find "$TARBALL" -mtime +"${IMAGE_CACHE_MAX_AGE_DAYS:-7}")" ]; then
    step "root tree from the cache: $TARBALL"
    CACHE_HIT=yes
else
    CACHE_HIT=no
    step "root tree: mmdebstrap $SUITE $DEB_ARCH (${#PACKAGES[@]} packages; a few minutes, ~8 under qemu-user)"
    PARTIAL=$CACHE_DIR/partial-$DEB_ARCH-$KEY.tar # mmdebstrap picks its output format from the name
    # The initramfs-tools configuration goes in before the kernel is installed (essential hook). The
    # initramfs is built exactly ONCE, at the end, with the verity hook: update-initramfs is diverted to a
    # no-op while packages install (the kernel's postinst and the end-of-run trigger would each build one;
    # under qemu-user each takes many minutes), then restored and run. A target with INITRAMFS_MODULES
    # gets MODULES=list with those modules instead of the configuration's MODULES=most. The boot files
    # (GRUB's EFI modules, systemd's EFI stub) are downloaded and unpacked beside the tree, in
    # /opt/m365-bootfiles, never installed into it.
    IR=$IMAGE_DIR/rootfs/etc/initramfs-tools
    HOOKS=$WORK_HOOKS
    rm -rf "$HOOKS" && mkdir -p "$HOOKS"
    {
        echo 'set -e'
        echo 'mkdir -p "$1/etc/initramfs-tools" "$1/usr/sbin"'
        echo "cp -a '$IR/.' \"\$1/etc/initramfs-tools/\""
        echo 'chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs'
        echo 'printf "#!/bin/sh\\nexit 0\\n" > "$1/usr/sbin/update-initramfs"'
        echo 'chmod 755 "$1/usr/sbin/update-initramfs"'
    } > "$HOOKS/essential.sh"
    {
        echo 'set -e'
        echo 'rm -f "$1/usr/sbin/update-initramfs"'
        echo 'chroot "$1" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs'
        # After initramfs-tools is installed: its modules file is a conffile.
        if [ ${#INITRAMFS_MODULES[@]} -gt 0 ]; then
            echo 'echo MODULES=list > "$1/etc/initramfs-tools/conf.d/zz-target.conf"'
            echo "printf '%s\\n' ${INITRAMFS_MODULES[*]} >> \"\$1/etc/initramfs-tools/modules\""
        fi
        echo 'chroot "$1" update-initramfs -c -k all'
    } > "$HOOKS/initramfs.sh"
    mmdebstrap --variant=minbase --architectures="$DEB_ARCH" --components="$COMPONENTS" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --essential-hook="sh '$HOOKS/essential.sh' \"\$1\"" \
        --customize-hook="sh '$HOOKS/initramfs.sh' \"\$1\"" \
        --customize-hook="rm -f \"\$1/etc/resolv.conf\" && cp /etc/resolv.conf \"\$1/etc/resolv.conf\"" \
        --customize-hook="chroot \"\$1\" sh -c 'cd /tmp && apt-get download -q $GRUB_PACKAGE systemd-boot-efi'" \
        --customize-hook="mkdir -p \"\$1/opt/m365-bootfiles\" && for d in \"\$1\"/tmp/*.deb; do dpkg-deb -x \"\$d\" \"\$1/opt/m365-bootfiles\"; done && rm -f \"\$1\"/tmp/*.deb" \
        --customize-hook="chroot \"\$1\" sh -c 'ls /boot/initrd.img-*' >/dev/null" \
        "$SUITE" "$PARTIAL" "$HOST_SOURCES" >"$OUT/mmdebstrap.log" 2>&1 ||
        { tail -n 30 "$OUT/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $OUT/mmdebstrap.log)"; }
    mv -f "$PARTIAL" "$TARBALL"
    # Older tarballs of this architecture are stale now.
    find "$CACHE_DIR" -name "rootfs-$DEB_ARCH-*.tar" ! -name "${TARBALL##*/}" -delete
fi
timed "root-tree(cache=$CACHE_HIT)" "$t"

t=$(date +%s.%N)
rm -rf "$WORK"
mkdir -p "$WORK/tree"
TREE=$WORK/tree
tar -C "$TREE" --numeric-owner -xpf "$TARBALL"
BOOTFILES=$WORK/bootfiles
mv "$TREE/opt/m365-bootfiles" "$BOOTFILES"
KVER=$(cd "$TREE/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[ -n "$KVER" ] && [ -f "$TREE/boot/initrd.img-$KVER" ] || die "no kernel or initramfs in the tree"
KERNEL_PKG_VERSION=$(dpkg-query --admindir="$TREE/var/lib/dpkg" -W -f='${Version}' "linux-image-$KVER")
timed "extract" "$t"

# ---- 2. the agent, the overlay, hardening ------------------------------------------------------------
t=$(date +%s.%N)
step "agent $AGENT_VERSION, overlay, units, hardening"
groupadd --prefix "$TREE" --system --gid "$SERVICE_UID" m365-sensor
useradd --prefix "$TREE" --system --uid "$SERVICE_UID" --gid "$SERVICE_UID" --home-dir /var/lib/m365-sensor \
    --no-create-home --shell /usr/sbin/nologin --comment "Microsoft 365 audit log sensor" m365-sensor
DEB=$(VERSION=$AGENT_VERSION DEB_COMPRESSION=gzip "$REPO/dist/deb/build-deb.sh" "$BIN" "$WORK/deb" "$DEB_ARCH")
dpkg --root="$TREE" --force-script-chrootless --force-architecture --log=/dev/null -i "$DEB" >/dev/null
if [ -n "${M365_BROKEN_AGENT:-}" ]; then
    note "M365_BROKEN_AGENT: the agent binary is replaced by one that exits 1 (rollback test image)"
    printf '#!/bin/sh\necho "m365-sensor: deliberately broken test build" >&2\nexit 1\n' > "$TREE/usr/bin/m365-sensor"
fi

# The overlay: everything under image/rootfs except templates (*.in) and the initramfs configuration
# (already in the cached tree).
tar -C "$IMAGE_DIR/rootfs" --exclude='*.in' --exclude='./etc/initramfs-tools' -cf - . |
    tar -C "$TREE" -xf - --no-same-owner --no-overwrite-dir
chown -R 0:0 "$TREE/usr/libexec/m365-sensor" "$TREE/etc/systemd" "$TREE/usr/lib/systemd/system"
# dist/systemd: the agent's helper units (reboot and update requests), whichever exist.
for u in "$REPO"/dist/systemd/*.path "$REPO"/dist/systemd/*.service; do
    [ "$(basename "$u")" = m365-sensor.service ] && continue
    [ -f "$u" ] && install -m 0644 "$u" "$TREE/usr/lib/systemd/system/"
done
# RAUC: system.conf from the layout, the keyring.
slots=""
for s in a b; do
    i=$([ $s = a ] && echo 0 || echo 1)
    S=$(echo $s | tr a-z A-Z)
    slots+="[slot.rootfs.$i]\ndevice=/dev/disk/by-partlabel/root-$s\ntype=raw\nbootname=$S\n\n"
    slots+="[slot.boot.$i]\ndevice=/dev/disk/by-partlabel/boot-$s\ntype=raw\nparent=rootfs.$i\n\n"
    slots+="[slot.verity.$i]\ndevice=/dev/disk/by-partlabel/verity-$s\ntype=raw\nparent=rootfs.$i\n\n"
done
sed -e "s/@COMPATIBLE@/m365-sensor-$TARGET/" "$IMAGE_DIR/rootfs/etc/rauc/system.conf.in" |
    awk -v slots="$(printf '%b' "$slots")" '$0 == "@SLOTS@" { print slots; next } { print }' \
        > "$TREE/etc/rauc/system.conf"
install -m 0644 "$KEYS/signing.cert.pem" "$TREE/etc/rauc/keyring.pem"

# Identity of this image.
mkdir -p "$TREE/usr/lib/m365-sensor" "$TREE/efi"
cat > "$TREE/usr/lib/m365-sensor/image-release" <<EOF
IMAGE_ID=m365-sensor
IMAGE_VERSION=$IMAGE_VERSION
IMAGE_TARGET=$TARGET
AGENT_VERSION=$AGENT_VERSION
KERNEL=$KVER
RAUC_COMPATIBLE=m365-sensor-$TARGET
MIN_VERSION=$MIN_VERSION
EOF
# The downgrade switch, only when asked for at build time (m365-update: a root-owned file in the image).
rm -f "$TREE/usr/lib/m365-sensor/allow-downgrade"
if [ "${IMAGE_ALLOW_DOWNGRADE:-0}" = 1 ]; then
    echo "downgrades allowed (down to MIN_VERSION=$MIN_VERSION) by the image's build" > "$TREE/usr/lib/m365-sensor/allow-downgrade"
    chmod 0644 "$TREE/usr/lib/m365-sensor/allow-downgrade"
fi
echo m365-sensor > "$TREE/etc/hostname"

# Units: enable what runs, mask logins on consoles (root is locked anyway).
systemctl --root="$TREE" --quiet enable m365-sensor.service nftables.service systemd-networkd.service \
    systemd-networkd-wait-online.service systemd-resolved.service systemd-timesyncd.service \
    m365-provision.service m365-enroll.service m365-health.service m365-boot-report.service
for u in m365-sensor-reboot.path m365-sensor-update.path; do
    [ -f "$TREE/usr/lib/systemd/system/$u" ] && systemctl --root="$TREE" --quiet enable "$u"
done
systemctl --root="$TREE" --quiet mask getty@.service serial-getty@.service autovt@.service \
    console-getty.service e2scrub_all.timer e2scrub_reap.service apt-daily.timer apt-daily-upgrade.timer \
    systemd-firstboot.service dpkg-db-backup.timer 2>/dev/null
systemctl --root="$TREE" --quiet set-default multi-user.target

# A read-only root: empty machine-id (transient), resolv.conf from resolved's upstream list.
: > "$TREE/etc/machine-id"
ln -sfn ../run/systemd/resolve/resolv.conf "$TREE/etc/resolv.conf"
# Root locked: no password can ever be used (console, su, sulogin).
sed -i 's/^root:[^:]*:/root:!*:/' "$TREE/etc/shadow"

# The manifest, while the package database is still there ("dpkg-query -W" on the tree's database).
dpkg-query --admindir="$TREE/var/lib/dpkg" -W -f='${binary:Package}\t${Version}\n' | LC_ALL=C sort \
    > "$WORK/packages.tsv"
cp "$WORK/packages.tsv" "$TREE/usr/lib/m365-sensor/packages.tsv"

# No package caches, lists or database, no docs or man pages (copyright files stay), no initramfs
# leftovers in /boot (the kernel and initramfs live in the unified kernel images).
rm -rf "$TREE"/var/cache/apt/* "$TREE"/var/lib/apt/lists/* "$TREE"/var/cache/debconf/*-old \
    "$TREE"/usr/share/man "$TREE"/usr/share/info "$TREE"/usr/share/lintian "$TREE"/usr/share/bug \
    "$TREE"/var/log/*.log "$TREE"/var/log/apt "$TREE/opt/m365-bootfiles" "$TREE"/tmp/*
find "$TREE/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
find "$TREE/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$TREE/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
mkdir -p "$WORK/boot"
mv "$TREE/boot/vmlinuz-$KVER" "$TREE/boot/initrd.img-$KVER" "$WORK/boot/"
rm -rf "$TREE"/boot/* "$TREE"/vmlinuz* "$TREE"/initrd.img*

# /var becomes the data partition: its tree (minus the package database and caches) seeds the partition,
# the root keeps an empty mount point.
DATA=$WORK/data
mkdir -p "$DATA"
rm -rf "$TREE/var/lib/dpkg" "$TREE/var/lib/apt" "$TREE/var/cache/apt" "$TREE/var/cache/debconf" \
    "$TREE/var/cache/ldconfig" "$TREE/var/lib/systemd/deb-systemd-"* "$TREE/var/lib/ucf"
(cd "$TREE/var" && tar -cf - .) | tar -C "$DATA" -xpf -
rm -rf "${TREE:?}/var" && install -d -m 0755 "$TREE/var"
install -d -m 0755 "$DATA/etc"
install -d -m 0750 -o 0 -g "$SERVICE_UID" "$DATA/etc/m365-sensor"
install -d -m 0700 -o "$SERVICE_UID" -g "$SERVICE_UID" "$DATA/lib/m365-sensor"
install -d -m 0700 "$DATA/lib/m365-provision" "$DATA/lib/m365-provision/applied" "$DATA/lib/rauc" \
    "$DATA/lib/m365-update"
JGID=$(awk -F: '$1 == "systemd-journal" { print $3 }' "$TREE/etc/group")
install -d -m 2755 -o 0 -g "${JGID:-0}" "$DATA/log/journal"
install -d -m 1777 "$DATA/tmp"

# Hardening checks: each is a promise of the image (product tests S2, S4, S6).
for f in cc gcc g++ c++ clang tcc cpp as ld ld.bfd ld.gold rustc cargo go make; do
    [ ! -e "$TREE/usr/bin/$f" ] || die "hardening: $f is in the image (no compiler or toolchain allowed)"
done
# perl-base is essential in Debian (/usr/bin/perl); it is no compiler, so only the toolchains above count.
for f in usr/sbin/sshd usr/sbin/dropbear usr/sbin/telnetd usr/sbin/in.telnetd; do
    [ ! -e "$TREE/$f" ] || die "hardening: $f is in the image (no network login by default)"
done
[ -z "$(ls -A "$TREE/var/")" ] || die "hardening: /var of the root is not empty"
case "$(awk -F: '$1 == "root" { print $2 }' "$TREE/etc/shadow")" in
    '!'*|'*'*) ;;
    *) die "hardening: the root account is not locked" ;;
esac
[ ! -s "$TREE/etc/machine-id" ] || die "hardening: /etc/machine-id is not empty"
[ -z "$(find "$TREE/usr/share/doc" -type f ! -name copyright | head -n1)" ] || die "hardening: docs left"
[ ! -e "$TREE/usr/share/man" ] || die "hardening: man pages left"
grep -q '^m365-sensor:' "$TREE/etc/passwd" || die "hardening: no m365-sensor user"
[ -L "$TREE/etc/systemd/system/multi-user.target.wants/systemd-timesyncd.service" ] ||
    [ -L "$TREE/etc/systemd/system/sysinit.target.wants/systemd-timesyncd.service" ] ||
    die "hardening: time sync is not enabled"
analysis=$(systemd-analyze security --offline=yes --root="$TREE" m365-sensor.service 2>&1) || true
EXPOSURE=$(printf '%s\n' "$analysis" |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n1)
[ -n "$EXPOSURE" ] || { printf '%s\n' "$analysis" | tail -n 20 >&2; die "systemd-analyze security gave no exposure"; }
awk -v e="$EXPOSURE" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
    die "hardening: m365-sensor.service exposure $EXPOSURE > $MAX_EXPOSURE"
step "agent unit exposure $EXPOSURE (<= $MAX_EXPOSURE)"
# The units that act for the agent (its update and reboot requests, its enrolment) are sandboxed too: a
# compromised agent must gain nothing from them (docs/IMAGE.md, "The agent is not trusted by the helper").
HELPER_EXPOSURE=""
for u in m365-sensor-update.service m365-sensor-reboot.service m365-enroll.service; do
    e=$(systemd-analyze security --offline=yes --root="$TREE" "$u" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n1)
    [ -n "$e" ] && awk -v e="$e" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
        die "hardening: $u exposure ${e:-unknown} > $MAX_EXPOSURE"
    HELPER_EXPOSURE="$HELPER_EXPOSURE $u=$e"
done
step "helper units' exposure:$HELPER_EXPOSURE"
timed "customize+checks" "$t"

# ---- 3. slot images ----------------------------------------------------------------------------------
t=$(date +%s.%N)
SLOT=$OUT/slot
rm -rf "$SLOT" && mkdir -p "$SLOT"
step "erofs root"
mkfs.erofs -zlz4hc,12 -T "$EPOCH" --quiet "$SLOT/root.erofs" "$TREE" >/dev/null
ROOT_MIB=$(layout_field root-a size_mib)
root_bytes=$(stat -c %s "$SLOT/root.erofs")
[ "$root_bytes" -le $((ROOT_MIB * 1048576)) ] || die "root image $root_bytes bytes > root partition $ROOT_MIB MiB"
timed "erofs" "$t"

t=$(date +%s.%N)
SALT=$(sha256sum "$SLOT/root.erofs" | cut -c1-64)
ROOTHASH=$(veritysetup format "$SLOT/root.erofs" "$SLOT/root.verity" --salt="$SALT" |
    sed -n 's/^Root hash:[[:space:]]*//p')
[ ${#ROOTHASH} = 64 ] || die "veritysetup format gave no root hash"
[ "$(stat -c %s "$SLOT/root.verity")" -le $(($(layout_field verity-a size_mib) * 1048576)) ] ||
    die "hash tree larger than the verity partition"
timed "verity" "$t"

t=$(date +%s.%N)
step "unified kernel images (kernel $KVER)"
KERNEL=$WORK/boot/vmlinuz-$KVER
if [ "$(head -c2 "$KERNEL" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
    # arm64: Debian ships a gzip-compressed Image; systemd-stub needs the EFI-bootable Image itself.
    zcat "$KERNEL" > "$WORK/boot/Image"
    KERNEL=$WORK/boot/Image
fi
STUBFILE=$BOOTFILES/usr/lib/systemd/boot/efi/$STUB
[ -f "$STUBFILE" ] || die "$STUBFILE missing"
OBJDUMP=${OBJCOPY%objcopy}objdump
printf 'NAME="m365-sensor"\nID=m365-sensor\nID_LIKE=debian\nVERSION_ID="%s"\nPRETTY_NAME="m365-sensor appliance %s"\n' \
    "$IMAGE_VERSION" "$IMAGE_VERSION" > "$WORK/boot/os-release"
uki() { # SLOT(A|B) OUTPUT: a unified kernel image whose command line opens that slot's root
    local s=$1 out=$2 l cmd align end size vma off
    l=$(echo "$s" | tr AB ab)
    cmd="rauc.slot=$s m365.verity=root-$l:verity-$l m365.roothash=$ROOTHASH root=/dev/mapper/root $CMDLINE_COMMON $CONSOLE"
    printf '%s' "$cmd" > "$WORK/boot/cmdline-$s"
    align=$((16#$("$OBJDUMP" -p "$STUBFILE" | awk '$1 == "SectionAlignment" { print $2 }')))
    end=0
    while read -r size vma; do
        [ $((16#$size + 16#$vma)) -gt "$end" ] && end=$((16#$size + 16#$vma))
    done < <("$OBJDUMP" -h "$STUBFILE" | awk 'NF == 7 && $1 ~ /^[0-9]+$/ { print $3, $4 }')
    off=$(( (end + align - 1) / align * align ))
    local args=() f name
    for name in osrel cmdline linux initrd; do
        case $name in
            osrel) f=$WORK/boot/os-release ;;
            cmdline) f=$WORK/boot/cmdline-$s ;;
            linux) f=$KERNEL ;;
            initrd) f=$WORK/boot/initrd.img-$KVER ;;
        esac
        args+=(--add-section ".$name=$f" --change-section-vma ".$name=$(printf 0x%x "$off")")
        off=$(( (off + $(stat -Lc %s "$f") + align - 1) / align * align ))
    done
    "$OBJCOPY" "${args[@]}" "$STUBFILE" "$out"
}
uki A "$WORK/boot/m365-A.efi"
uki B "$WORK/boot/m365-B.efi"
BOOT_MIB=$(layout_field boot-a size_mib)
mkfs.vfat -C -n M365BOOT "$SLOT/boot.vfat" $((BOOT_MIB * 1024)) >/dev/null
mmd -i "$SLOT/boot.vfat" ::/EFI ::/EFI/Linux
mcopy -i "$SLOT/boot.vfat" "$WORK/boot/m365-A.efi" "$WORK/boot/m365-B.efi" ::/EFI/Linux/
UKI_BYTES=$(stat -c %s "$WORK/boot/m365-A.efi")
cat > "$SLOT/slot.env" <<EOF
TARGET=$TARGET
ARCH=$ARCH
IMAGE_VERSION=$IMAGE_VERSION
AGENT_VERSION=$AGENT_VERSION
KERNEL=$KVER
ROOTHASH=$ROOTHASH
COMPATIBLE=m365-sensor-$TARGET
EOF
timed "uki+boot" "$t"

# ---- 4. the disk -------------------------------------------------------------------------------------
t=$(date +%s.%N)
step "ESP (GRUB $GRUB_PLATFORM), data partition, GPT"
GRUBMODS=$BOOTFILES/usr/lib/grub/$GRUB_PLATFORM
[ -d "$GRUBMODS" ] || die "$GRUBMODS missing"
grub-mkimage -O "$GRUB_PLATFORM" -d "$GRUBMODS" -o "$WORK/$EFI_BOOT_NAME" -p /EFI/BOOT \
    part_gpt fat normal configfile loadenv regexp test echo chain reboot halt sleep efi_gop
sed -e "s/@ESP@/$(layout_field esp num)/; s/@BOOT_A@/$(layout_field boot-a num)/; s/@BOOT_B@/$(layout_field boot-b num)/" \
    "$IMAGE_DIR/grub.cfg.in" > "$WORK/grub.cfg"
rm -f "$WORK/grubenv"
grub-editenv "$WORK/grubenv" create
grub-editenv "$WORK/grubenv" set "ORDER=A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0
mkfs.vfat -C -n M365ESP "$WORK/esp.vfat" $(($(layout_field esp size_mib) * 1024)) >/dev/null
mmd -i "$WORK/esp.vfat" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.vfat" "$WORK/$EFI_BOOT_NAME" "$WORK/grub.cfg" "$WORK/grubenv" ::/EFI/BOOT/

mke2fs -q -t ext4 -L m365-data -d "$DATA" -E root_owner=0:0 -U random "$WORK/data.ext4" \
    "$(layout_field data size_mib)M"

NAME=m365-sensor-$TARGET
RAW=$OUT/$NAME.raw
rm -f "$RAW"
truncate -s "$(layout_disk_mib)M" "$RAW"
{
    echo "label: gpt"
    echo "first-lba: 2048"
    layout_rows | while read -r num label type size; do
        echo "$num : start=$(( $(layout_start_mib "$label") * 2048 )), size=$((size * 2048)), type=$(type_guid "$type" "$ARCH"), name=\"$label\""
    done
} | sfdisk --quiet --no-reread --no-tell-kernel "$RAW"
place() { # IMAGE LABEL
    dd if="$1" of="$RAW" bs=1M seek="$(layout_start_mib "$2")" conv=notrunc,sparse status=none
}
place "$WORK/esp.vfat" esp
place "$SLOT/boot.vfat" boot-a
place "$SLOT/root.erofs" root-a
place "$SLOT/root.verity" verity-a
place "$WORK/data.ext4" data
timed "disk" "$t"

# ---- 5. outputs --------------------------------------------------------------------------------------
t=$(date +%s.%N)
step "qcow2, vmdk, vhdx"
for fmt in "${OUTPUTS[@]}"; do
    rm -f "$OUT/$NAME.$fmt"
    case $fmt in
        qcow2) qemu-img convert -f raw -O qcow2 -c "$RAW" "$OUT/$NAME.qcow2" ;;
        vmdk) qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$RAW" "$OUT/$NAME.vmdk" ;;
        vhdx) qemu-img convert -f raw -O vhdx -o subformat=dynamic "$RAW" "$OUT/$NAME.vhdx" ;;
        *) die "unknown output format $fmt" ;;
    esac
done
for f in "$OUT/$NAME".{raw,qcow2,vmdk,vhdx}; do
    [ -f "$f" ] && (cd "$OUT" && sha256sum "${f##*/}" > "${f##*/}.sha256")
done
timed "outputs" "$t"

BUILD_SECS=$(elapsed "$T0")
{
    echo "image: m365-sensor $TARGET"
    echo "image_version: $IMAGE_VERSION"
    echo "agent: m365-sensor $AGENT_VERSION (sha256 $(sha256sum "$BIN" | cut -c1-64))"
    echo "kernel: $KVER (linux-image-$KVER $KERNEL_PKG_VERSION)"
    echo "root_hash: $ROOTHASH"
    echo "rauc_compatible: m365-sensor-$TARGET"
    echo "min_version: $MIN_VERSION (downgrade switch in the image: $([ "${IMAGE_ALLOW_DOWNGRADE:-0}" = 1 ] && echo yes || echo no))"
    echo "agent_unit_exposure: $EXPOSURE"
    echo "helper_unit_exposure:$HELPER_EXPOSURE"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) in ${BUILD_SECS}s (root tree cache: $CACHE_HIT, key $KEY)"
    echo "sizes_bytes: raw=$(stat -c %s "$RAW") raw_allocated=$(( $(stat -c %b "$RAW") * 512 )) root_erofs=$root_bytes uki=$UKI_BYTES$(for fmt in "${OUTPUTS[@]}"; do printf ' %s=%s' "$fmt" "$(stat -c %s "$OUT/$NAME.$fmt")"; done)"
    echo "steps_secs: ${TIMES[*]}"
    echo "packages: $(wc -l < "$WORK/packages.tsv")"
    sed 's/^/  /' "$WORK/packages.tsv"
} > "$OUT/manifest.txt"
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
step "done in ${BUILD_SECS}s: $OUT"
sed -n '1,10p' "$OUT/manifest.txt" >&2
