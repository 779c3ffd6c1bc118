#!/usr/bin/env bash
# Builds the Debian package of the m365-sensor agent from a built binary, without cargo-deb or debhelper:
#
#   dist/deb/build-deb.sh BINARY OUTDIR [ARCH]
#
# BINARY  the agent binary (e.g. target/release/m365-sensor, or dist/bin/m365-sensor-x86_64 from
#         scripts/dist.sh). Its `--version` output (`m365-sensor X.Y.Z`) gives the package version; set
#         VERSION=X.Y.Z to skip running it (e.g. a foreign-architecture binary).
# OUTDIR  where m365-sensor_<version>_<arch>.deb is written (created if missing). The path of the .deb is
#         printed on stdout, nothing else.
# ARCH    Debian architecture (amd64, arm64, ...). Default: from the binary's ELF header, else
#         `dpkg --print-architecture`.
#
# Environment: VERSION (see above), DEB_REVISION (Debian revision appended as -N; default none),
# DEB_COMPRESSION (xz | gzip | zstd | none; default xz), DEB_COMPRESS_LEVEL (default: dpkg-deb's),
# MAINTAINER (default below), SOURCE_DATE_EPOCH (changelog date, for reproducible builds).
#
# lintian, accepted on purpose: maintainer-script-calls-systemctl (no debhelper/deb-systemd-helper, so the
# package stays dependency-free; the calls only run when systemd is PID 1), maintainer-script-should-not-
# parse-etc-passwd-or-group (getent cannot look inside a `dpkg --root` target), non-standard-dir-perm /
# non-standard-file-perm (/etc/m365-sensor 0750 and the example 0640: the configuration is not world-
# readable), no-manual-page. A debug binary also gives unstripped-binary-or-object; the release profile
# strips.
#
# Needs only dpkg-deb (dpkg), coreutils, sed, od. The package contents:
#   /usr/bin/m365-sensor                         0755 root:root
#   /lib/systemd/system/m365-sensor.service      0644
#   /lib/systemd/system/m365-sensor-reboot.{path,service} 0644 (the backend's `reboot` command)
#   /etc/m365-sensor/sensor.toml.example         0640 (conffile; the postinst makes it root:m365-sensor)
#   /usr/share/doc/m365-sensor/{README.md,copyright}
# and the maintainer scripts postinst (user, group, directories), prerm (stop), postrm (purge).
set -euo pipefail

die() { echo "build-deb: $*" >&2; exit 1; }

[ $# -ge 2 ] && [ $# -le 3 ] || die "usage: $0 BINARY OUTDIR [ARCH]"
BIN=$1
OUTDIR=$2
ARCH=${3:-}
HERE=$(cd "$(dirname "$0")" && pwd)
DIST=$(cd "$HERE/.." && pwd)
PKG=m365-sensor
MAINTAINER=${MAINTAINER:-"m365-sensor maintainers <m365-sensor@example.net>"}
COMPRESSION=${DEB_COMPRESSION:-xz}

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg)"
[ -f "$BIN" ] || die "$BIN: no such file"
[ -x "$BIN" ] || die "$BIN: not executable"
for f in "$DIST/systemd/$PKG.service" "$DIST/systemd/$PKG-reboot.path" "$DIST/systemd/$PKG-reboot.service" \
    "$DIST/sensor.toml.example" "$DIST/README.md"; do
    [ -f "$f" ] || die "$f is missing"
done

# ---- version -------------------------------------------------------------------------------------------
if [ -z "${VERSION:-}" ]; then
    out=$("$BIN" --version 2>/dev/null) || die "$BIN --version failed (foreign architecture? set VERSION=X.Y.Z)"
    VERSION=$(printf '%s\n' "$out" | sed -n "s/^$PKG \([0-9][0-9A-Za-z.+~-]*\)\$/\1/p" | head -n1)
    [ -n "$VERSION" ] || die "cannot read the version from '$out' (expected '$PKG X.Y.Z')"
fi
case $VERSION in
    [0-9]*) ;;
    *) die "version '$VERSION' must start with a digit" ;;
esac
[ -n "${DEB_REVISION:-}" ] && VERSION="$VERSION-$DEB_REVISION"

# ---- architecture --------------------------------------------------------------------------------------
elf_arch() { # Debian architecture of an ELF file, from e_machine (little-endian 64-bit targets only)
    local magic class machine
    magic=$(od -An -tx1 -N4 "$1" | tr -d ' \n')
    [ "$magic" = 7f454c46 ] || return 1
    class=$(od -An -tu1 -j4 -N1 "$1" | tr -d ' \n')
    machine=$(od -An -tu2 -j18 -N2 --endian=little "$1" | tr -d ' \n')
    case "$class:$machine" in
        2:62) echo amd64 ;;
        2:183) echo arm64 ;;
        2:243) echo riscv64 ;;
        *) return 1 ;;
    esac
}
if [ -z "$ARCH" ]; then
    ARCH=$(elf_arch "$BIN" 2>/dev/null) || ARCH=$(dpkg --print-architecture)
fi

# Depends: useradd/groupadd (passwd, Priority required but not Essential). A dynamically linked binary
# (glibc host build) also needs libc6; the static musl appliance build needs nothing else.
DEPENDS="passwd"
if LC_ALL=C grep -qa -m1 -e '/ld-linux' -e 'GLIBC_2\.' "$BIN"; then
    DEPENDS="libc6, $DEPENDS"
fi

# ---- staging tree --------------------------------------------------------------------------------------
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/$PKG-deb.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/root"
umask 022
install -d -m 0755 "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/lib/systemd/system" "$ROOT/usr/share/doc/$PKG"
install -d -m 0750 "$ROOT/etc/$PKG"
install -m 0755 "$BIN" "$ROOT/usr/bin/$PKG"
install -m 0644 "$DIST/systemd/$PKG.service" "$ROOT/lib/systemd/system/$PKG.service"
install -m 0644 "$DIST/systemd/$PKG-reboot.path" "$ROOT/lib/systemd/system/$PKG-reboot.path"
install -m 0644 "$DIST/systemd/$PKG-reboot.service" "$ROOT/lib/systemd/system/$PKG-reboot.service"
install -m 0640 "$DIST/sensor.toml.example" "$ROOT/etc/$PKG/sensor.toml.example"
install -m 0644 "$DIST/README.md" "$ROOT/usr/share/doc/$PKG/README.md"
cat > "$ROOT/usr/share/doc/$PKG/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: m365-sensor

Files: *
Copyright: 2025-2026 The m365-sensor authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found in
 /usr/share/common-licenses/Apache-2.0.
EOF
chmod 0644 "$ROOT/usr/share/doc/$PKG/copyright"
# A native package's changelog (Debian policy 12.7), one entry for this build.
{
    echo "$PKG ($VERSION) stable; urgency=medium"
    echo
    echo "  * Release $VERSION."
    echo
    echo " -- $MAINTAINER  $(LC_ALL=C date -R ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH})"
} | gzip -9n > "$ROOT/usr/share/doc/$PKG/changelog.gz"
chmod 0644 "$ROOT/usr/share/doc/$PKG/changelog.gz"

SIZE_KB=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)

cat > "$ROOT/DEBIAN/control" <<EOF
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $SIZE_KB
Depends: $DEPENDS
Section: admin
Priority: optional
Homepage: https://example.net/m365-sensor
Description: Microsoft 365 audit log sensor
 Collects Microsoft 365 audit logs (Office 365 Management Activity API) for
 one or more tenants, buffers them durably in a local spool and relays them
 compressed over HTTPS to the analysis backend. Outbound connections only.
 .
 The agent runs as the system user m365-sensor under a sandboxed systemd unit
 (m365-sensor.service). Configure /etc/m365-sensor/sensor.toml from the
 example next to it, then enable the service.
EOF

cat > "$ROOT/DEBIAN/conffiles" <<EOF
/etc/$PKG/sensor.toml.example
EOF

# postinst: the system user and group, the directories, systemd. Idempotent. Works under
# `dpkg --root=DIR` (dpkg exports DPKG_ROOT; with --force-script-chrootless the script runs outside DIR, so
# every path is "$DPKG_ROOT/...", and useradd/groupadd get --prefix).
cat > "$ROOT/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e

PKG=m365-sensor
USER_NAME=m365-sensor
HOME_DIR=/var/lib/m365-sensor
CONF_DIR=/etc/m365-sensor
ROOT="${DPKG_ROOT:-}"

case "${1:-}" in
    configure|reconfigure) ;;
    *) exit 0 ;;   # abort-upgrade, abort-remove, abort-deconfigure: nothing to undo
esac

# Under dpkg --root, useradd/groupadd edit "$ROOT/etc/passwd" and "$ROOT/etc/group" (--prefix, shadow >= 4.9;
# Debian 12 has 4.13) and never the running system's.
if [ -n "$ROOT" ]; then
    set -- --prefix "$ROOT"
else
    set --
fi
if ! grep -q "^$USER_NAME:" "$ROOT/etc/group" 2>/dev/null; then
    groupadd "$@" --system "$USER_NAME"
fi
if ! grep -q "^$USER_NAME:" "$ROOT/etc/passwd" 2>/dev/null; then
    useradd "$@" --system --gid "$USER_NAME" --home-dir "$HOME_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "Microsoft 365 audit log sensor" "$USER_NAME"
fi

id_of() { # field 3 (the numeric id) of entry $2 in the passwd or group file $1
    sed -n "s/^$2:[^:]*:\([0-9][0-9]*\):.*/\1/p" "$1" | head -n1
}
USER_ID=$(id_of "$ROOT/etc/passwd" "$USER_NAME")
GROUP_ID=$(id_of "$ROOT/etc/group" "$USER_NAME")
if [ -z "$USER_ID" ] || [ -z "$GROUP_ID" ]; then
    echo "$PKG: user or group $USER_NAME missing after creation" >&2
    exit 1
fi

# State: the spool, status.json, quarantine. Only the agent's user may enter it. (Numeric ids: under
# dpkg --root the names exist only in the target's passwd and group.)
mkdir -p "$ROOT$HOME_DIR"
chown "$USER_ID:$GROUP_ID" "$ROOT$HOME_DIR"
chmod 0700 "$ROOT$HOME_DIR"

# Configuration: owned by root, readable by the agent's group. sensor.toml is the operator's (0640
# root:m365-sensor recommended); secrets in the directory must be m365-sensor 0600.
mkdir -p "$ROOT$CONF_DIR"
chown "0:$GROUP_ID" "$ROOT$CONF_DIR"
chmod 0750 "$ROOT$CONF_DIR"
if [ -f "$ROOT$CONF_DIR/sensor.toml.example" ]; then
    chown "0:$GROUP_ID" "$ROOT$CONF_DIR/sensor.toml.example"
    chmod 0640 "$ROOT$CONF_DIR/sensor.toml.example"
fi

# systemd: only on a host where it runs (not under dpkg --root, in an image build or a container without it).
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
    # Not enabled automatically: it needs sensor.toml first. On upgrade a running agent gets the new binary.
    systemctl try-restart "$PKG.service" >/dev/null 2>&1 || true
fi

if [ ! -e "$ROOT$CONF_DIR/sensor.toml" ]; then
    echo "$PKG: write $CONF_DIR/sensor.toml (see sensor.toml.example), then: systemctl enable --now $PKG $PKG-reboot.path"
fi
exit 0
EOF

# prerm: stop the agent before its binary goes away (SIGTERM: it drains and fsyncs its spool).
cat > "$ROOT/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
PKG=m365-sensor
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    case "$1" in
        remove|deconfigure)
            systemctl --no-reload disable "$PKG.service" >/dev/null 2>&1 || true
            systemctl stop "$PKG.service" || true
            ;;
        upgrade) ;;  # postinst of the new version restarts it
    esac
fi
exit 0
EOF

# postrm: remove keeps everything; purge removes the configuration directory's package-owned files and the
# systemd state, but KEEPS the spool (/var/lib/m365-sensor: audit records not yet delivered) and the
# m365-sensor user and group (files still owned by its uid must not be re-used by another account; Debian
# practice is not to delete system users). Delete them by hand if wanted:
#   rm -rf /var/lib/m365-sensor && userdel m365-sensor
cat > "$ROOT/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
PKG=m365-sensor
ROOT="${DPKG_ROOT:-}"
case "$1" in
    purge)
        rm -f "$ROOT/etc/$PKG/sensor.toml.example" "$ROOT/etc/$PKG/sensor.toml.example.dpkg-"*
        # sensor.toml and the credential files are the operator's; the directory stays if they exist.
        rmdir "$ROOT/etc/$PKG" 2>/dev/null || true
        if [ -d "$ROOT/var/lib/$PKG" ]; then
            echo "$PKG: kept /var/lib/$PKG (spooled audit records) and the user $PKG; remove them by hand if no longer needed"
        fi
        ;;
esac
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"
chmod 0644 "$ROOT/DEBIAN/control" "$ROOT/DEBIAN/conffiles"

# ---- build ---------------------------------------------------------------------------------------------
mkdir -p "$OUTDIR"
DEB="$OUTDIR/${PKG}_${VERSION}_${ARCH}.deb"
opts=(-Z"$COMPRESSION")
[ -n "${DEB_COMPRESS_LEVEL:-}" ] && opts+=(-z"$DEB_COMPRESS_LEVEL")
dpkg-deb --build --root-owner-group "${opts[@]}" "$ROOT" "$DEB" >/dev/null
echo "$DEB"
