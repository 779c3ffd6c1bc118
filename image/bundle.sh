#!/usr/bin/env bash
# Packs the slot images of a built image (OUTDIR/slot: root.erofs, root.verity, boot.vfat, from
# image/build.sh) into a signed RAUC bundle (verity format):
#
#   image/bundle.sh [OUTDIR]        default image/out/x86_64; writes OUTDIR/m365-sensor-<target>-<version>.raucb
#
# Signing: RAUC_KEYS_DIR (default image/out/keys) holds signing.key.pem and signing.cert.pem; image/build.sh
# generated a TEST key there and put its certificate into the image as the RAUC keyring. For production, set
# RAUC_KEYS_DIR to the release key's directory for both the image and the bundle builds. RAUC_KEY and
# RAUC_CERT override the two files (e.g. a PKCS#11 URI for the key).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=$(cd "${1:-$IMAGE_DIR/out/x86_64}" && pwd)
KEYS=${RAUC_KEYS_DIR:-$IMAGE_DIR/out/keys}
KEY=${RAUC_KEY:-$KEYS/signing.key.pem}
CERT=${RAUC_CERT:-$KEYS/signing.cert.pem}
command -v rauc >/dev/null || die "rauc not found: run image/host-deps.sh"
[ -f "$OUT/slot/slot.env" ] || die "$OUT/slot/slot.env missing: build the image first (make image)"
[ -f "$CERT" ] || die "$CERT missing"
[ -f "$KEY" ] || [[ "$KEY" == pkcs11:* ]] || die "$KEY missing"
# shellcheck source=/dev/null
source "$OUT/slot/slot.env"
T0=$(date +%s.%N)
STAGE=$(mktemp -d "$OUT/.bundle.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# RAUC 1.8 picks its copy method from the file name: a raw slot takes *.img, written byte for byte.
for pair in root.erofs:rootfs.img root.verity:verity.img boot.vfat:boot.img; do
    ln "$OUT/slot/${pair%%:*}" "$STAGE/${pair#*:}" 2>/dev/null || cp "$OUT/slot/${pair%%:*}" "$STAGE/${pair#*:}"
done
cat > "$STAGE/manifest.raucm" <<MF
[update]
compatible=$COMPATIBLE
version=$IMAGE_VERSION
description=m365-sensor $AGENT_VERSION, kernel $KERNEL, root hash $ROOTHASH
build=$(date -u +%Y%m%d%H%M%S)

[bundle]
format=verity

[image.rootfs]
filename=rootfs.img

[image.verity]
filename=verity.img

[image.boot]
filename=boot.img
MF
BUNDLE=$OUT/m365-sensor-$TARGET-$IMAGE_VERSION.raucb
rm -f "$BUNDLE"
rauc bundle --cert="$CERT" --key="$KEY" --keyring="$CERT" "$STAGE" "$BUNDLE" >"$STAGE/rauc.log" 2>&1 ||
    { cat "$STAGE/rauc.log" >&2; die "rauc bundle failed"; }
(cd "$OUT" && sha256sum "${BUNDLE##*/}" > "${BUNDLE##*/}.sha256")
note "$BUNDLE ($(stat -c %s "$BUNDLE") bytes, $COMPATIBLE $IMAGE_VERSION) in $(elapsed "$T0")s"
echo "$BUNDLE"
