#!/usr/bin/env bash
# Installs the Debian packages that the image pipeline (image/build.sh, image/bundle.sh), the provisioning
# tools (provision/) and the image tests (tests/image/) need on the build host, and mounts binfmt_misc
# when it is missing (foreign-architecture chroots under qemu-user need it). Idempotent; needs root.
#
#   image/host-deps.sh            # x86_64 and aarch64 tools
#
# Nothing else is downloaded: every tool is a Debian bookworm package.
set -euo pipefail

PKGS=(
    mmdebstrap                   # the root trees (bookworm minbase)
    erofs-utils                  # mkfs.erofs: the read-only root
    cryptsetup-bin               # veritysetup: the dm-verity hash trees
    fdisk                        # sfdisk: the GPT
    dosfstools mtools            # mkfs.vfat -C and mcopy: the ESP, without mounting
    e2fsprogs                    # mke2fs -d and debugfs: the data partition and the seed
    binutils                     # objcopy: the unified kernel image (x86_64)
    binutils-aarch64-linux-gnu   # aarch64-linux-gnu-objcopy: the unified kernel image (aarch64)
    qemu-utils                   # qemu-img: qcow2, vmdk, vhdx
    qemu-system-x86 ovmf         # boot tests, x86_64 (UEFI)
    qemu-system-arm qemu-efi-aarch64   # boot tests, aarch64 (UEFI)
    qemu-user-static arch-test   # mmdebstrap of the arm64 tree (arch-test: its foreign-arch check)
    rauc squashfs-tools          # signed update bundles (rauc bundle)
    grub-common                  # grub-mkimage, grub-editenv (the EFI modules come from the image's own package)
    openssl                      # the test signing key and certificate
    python3                      # tests/image/run.py
    xxd                          # provision tests
    zstd xz-utils                # compressed outputs and cache
    ca-certificates
)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "host-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Foreign chroots (mmdebstrap --architectures=arm64) run their maintainer scripts under qemu-user, which
# the kernel finds through binfmt_misc. On hosts whose PID 1 is not systemd it is not mounted.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    # qemu-user-static's postinst registers through update-binfmts when binfmt_misc is mounted; redo it.
    if command -v update-binfmts >/dev/null; then
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ -e /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
        sed -n 's/^\(:.*\)/\1/p' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    fi
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || echo "host-deps: warning: qemu-aarch64 is not registered in binfmt_misc (aarch64 builds will fail)" >&2
echo "host-deps: ok"
