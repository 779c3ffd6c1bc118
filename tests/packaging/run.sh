#!/usr/bin/env bash
# Packaging test: the systemd unit's sandbox (product test S1), the example configuration, and the Debian
# package built by dist/deb/build-deb.sh, installed into a scratch root with `dpkg --root` (never the
# host's dpkg database or /etc/passwd).
#
#   tests/packaging/run.sh [BINARY]       BINARY or $SENSOR_BIN, default target/debug/m365-sensor
#
# Prints one line per check and finally "N passed, M failed"; exits non-zero if any check failed.
# Needs root (the postinst chowns to the new user's ids) and the Debian packages: dpkg (dpkg, dpkg-deb),
# passwd (useradd, groupadd), systemd (systemd-analyze), coreutils, grep, sed.
# Environment: DEB_COMPRESSION (default gzip here, to keep the debug binary's package quick), KEEP=1 keeps
# the scratch directory.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
BIN=${1:-${SENSOR_BIN:-target/debug/m365-sensor}}
UNIT=dist/systemd/m365-sensor.service
EXAMPLE=dist/sensor.toml.example
MAX_EXPOSURE=2.0
PKG=m365-sensor

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
check() { # description, command...
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
finish() {
    echo "$passed passed, $failed failed"
    if [ "$failed" -eq 0 ]; then exit 0; else exit 1; fi
}
quiet() { "$@" > "$WORK/last.log" 2>&1 || { cat "$WORK/last.log"; return 1; }; }
abort() { fail "$*"; finish; }

# ---- prerequisites -------------------------------------------------------------------------------------
missing=()
for c in dpkg dpkg-deb useradd groupadd systemd-analyze stat sed grep; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
[ ${#missing[@]} -eq 0 ] || abort "missing commands: ${missing[*]} (apt-get install dpkg passwd systemd coreutils sed grep)"
[ "$(id -u)" -eq 0 ] || abort "must run as root (the postinst chowns files in the scratch root)"
[ -x "$BIN" ] || abort "$BIN not found: cargo build -p m365-sensor --no-default-features (or pass BINARY / SENSOR_BIN)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/m365-sensor-packaging.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

host_users_before=$(cat /etc/passwd /etc/group | sha256sum)
host_installed_before=$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)

# ---- (a) the unit's exposure ---------------------------------------------------------------------------
analysis=$(systemd-analyze security --offline=yes "$UNIT" 2>&1) || true
exposure=$(printf '%s\n' "$analysis" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n1)
if [ -z "$exposure" ]; then
    printf '%s\n' "$analysis" | tail -n5
    fail "systemd-analyze security: no 'Overall exposure level' line"
elif awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }'; then
    pass "unit exposure $exposure <= $MAX_EXPOSURE (systemd-analyze security --offline=yes)"
else
    printf '%s\n' "$analysis" | grep '✗' || true
    fail "unit exposure $exposure > $MAX_EXPOSURE"
fi
# The helper units that act on the agent's requests: a compromised agent must gain nothing from them.
# The reboot unit runs as the agent (systemd reboots: SuccessAction=); the update unit is root with three
# capabilities, no network, and writes only its own directories.
for u in dist/systemd/$PKG-reboot.service:0.5 dist/systemd/$PKG-update.service:2.0 \
    image/rootfs/usr/lib/systemd/system/m365-enroll.service:2.0; do
    f=${u%:*} max=${u##*:}
    e=$(systemd-analyze security --offline=yes "$f" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9][0-9]*\.[0-9]\).*/\1/p' | tail -n1)
    if [ -n "$e" ] && awk -v e="$e" -v m="$max" 'BEGIN { exit !(e <= m) }'; then
        pass "$(basename "$f") exposure $e <= $max"
    else
        fail "$(basename "$f") exposure ${e:-unknown} > $max"
    fi
done
check "the reboot unit runs as the agent user, never root in the agent's directory" \
    grep -qx "User=$PKG" dist/systemd/$PKG-reboot.service
check "the reboot unit reboots through systemd (SuccessAction=reboot), not a root command" \
    grep -qx "SuccessAction=reboot" dist/systemd/$PKG-reboot.service
check "the update unit has no network and keeps only the capabilities it needs" \
    grep -qx "CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID" dist/systemd/$PKG-update.service
unit_has() { grep -qx "$1" "$UNIT"; }
for line in "Type=notify" "NotifyAccess=main" "WatchdogSec=60" "ExecStart=/usr/bin/m365-sensor run --config /etc/m365-sensor/sensor.toml" \
    "User=m365-sensor" "StateDirectory=m365-sensor" "StateDirectoryMode=0700" "Restart=on-failure" \
    "KillSignal=SIGTERM" "TimeoutStopSec=10" "RuntimeDirectory=m365-sensor"; do
    check "unit has $line" unit_has "$line"
done
verify_out=$(systemd-analyze verify "$UNIT" 2>&1 | grep -v 'is not executable' || true)
check "systemd-analyze verify: no warnings besides the absent binary" test -z "$verify_out"
[ -z "$verify_out" ] || printf '%s\n' "$verify_out"

# ---- the example configuration passes check-config once its files exist -------------------------------
CFG="$WORK/config"
mkdir -p "$CFG/state"
sed -e "s#/etc/m365-sensor/#$CFG/#g" -e "s#\"/var/lib/m365-sensor\"#\"$CFG/state\"#" "$EXAMPLE" > "$CFG/sensor.toml"
for f in $(sed -n 's/^[a-z_]*_file = "\([^"]*\)"$/\1/p' "$CFG/sensor.toml"); do
    : > "$f"
    chmod 600 "$f"
done
check "example config passes check-config (files referenced: $(grep -c '^[a-z_]*_file = ' "$CFG/sensor.toml"))" \
    quiet "$BIN" check-config --config "$CFG/sensor.toml"
uncommented="$CFG/all-keys.toml"
sed -E -e 's/^#([a-z_]+ = )/\1/' -e 's/^#\[\[tenant\]\]/[[tenant]]/' "$CFG/sensor.toml" > "$uncommented"
all_keys_out=$("$BIN" check-config --config "$uncommented" 2>&1 || true)
check "every commented-out key of the example is a known key" \
    bash -c '! grep -qiE "unknown (field|key)|TOML parse error" <<<"$1"' _ "$all_keys_out"

# ---- (b) build the .deb --------------------------------------------------------------------------------
VERSION=$("$BIN" --version | sed -n "s/^$PKG //p")
ARCH=$(dpkg --print-architecture)
if DEB=$(DEB_COMPRESSION=${DEB_COMPRESSION:-gzip} DEB_COMPRESS_LEVEL=${DEB_COMPRESS_LEVEL:-1} \
    dist/deb/build-deb.sh "$BIN" "$WORK/out"); then
    pass "build-deb.sh built $(basename "$DEB")"
else
    abort "build-deb.sh failed"
fi
check "package file name is ${PKG}_${VERSION}_${ARCH}.deb" test "$DEB" = "$WORK/out/${PKG}_${VERSION}_${ARCH}.deb"
field() { dpkg-deb -f "$DEB" "$1"; }
check "control: Package/Version/Architecture" test "$(field Package) $(field Version) $(field Architecture)" = "$PKG $VERSION $ARCH"
check "control: Maintainer and Description present" test -n "$(field Maintainer)" -a -n "$(field Description)"
check "control: Depends on passwd (useradd)" grep -qw passwd <<<"$(field Depends)"
check "conffiles lists the example" test "$(dpkg-deb --ctrl-tarfile "$DEB" | tar -xO ./conffiles)" = "/etc/$PKG/sensor.toml.example"
listing=$(dpkg-deb -c "$DEB")
check "data: /usr/bin/m365-sensor 0755 root/root" grep -qE '^-rwxr-xr-x root/root .* \./usr/bin/m365-sensor$' <<<"$listing"
check "data: example config 0640" grep -qE '^-rw-r----- root/root .* \./etc/m365-sensor/sensor.toml.example$' <<<"$listing"

# ---- (c) install into a scratch root -------------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/var/log" "$R/etc"
: > "$R/var/lib/dpkg/status"
: > "$R/var/lib/dpkg/available"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\n' > "$R/etc/group"
# --force-script-chrootless: the maintainer scripts run on the host with DPKG_ROOT=$R (no chroot, so no
# shell is needed inside $R). --force-depends: the scratch root has no libc6/passwd packages.
dpkg_r() {
    dpkg --root="$R" --log="$R/var/log/dpkg.log" --force-not-root --force-script-chrootless --force-depends "$@"
}
if dpkg_r --install "$DEB" > "$WORK/install.log" 2>&1; then
    pass "dpkg --root --install"
else
    cat "$WORK/install.log"
    abort "dpkg --root --install failed"
fi

mode() { stat -c %a "$1"; }
owner() { stat -c %u:%g "$1"; }
check "binary installed, 0755" test -x "$R/usr/bin/$PKG" -a "$(mode "$R/usr/bin/$PKG")" = 755
check "installed binary runs --version ($PKG $VERSION)" test "$("$R/usr/bin/$PKG" --version)" = "$PKG $VERSION"
check "unit file in /lib/systemd/system" cmp -s "$R/lib/systemd/system/$PKG.service" "$UNIT"
check "reboot path unit installed" cmp -s "$R/lib/systemd/system/$PKG-reboot.path" dist/systemd/$PKG-reboot.path
check "reboot service installed" cmp -s "$R/lib/systemd/system/$PKG-reboot.service" dist/systemd/$PKG-reboot.service
check "example config installed, mode 0640" test -f "$R/etc/$PKG/sensor.toml.example" -a "$(mode "$R/etc/$PKG/sensor.toml.example")" = 640

pw=$(grep "^$PKG:" "$R/etc/passwd" || true)
gr=$(grep "^$PKG:" "$R/etc/group" || true)
uid=$(cut -d: -f3 <<<"$pw")
gid=$(cut -d: -f3 <<<"$gr")
check "user $PKG in the scratch /etc/passwd" test -n "$pw"
check "group $PKG in the scratch /etc/group" test -n "$gr"
check "user's primary group is $PKG" test -n "$gid" -a "$(cut -d: -f4 <<<"$pw")" = "$gid"
check "user has no login shell" grep -qE '/(usr/)?s?bin/(nologin|false)$' <<<"$pw"
check "user's home is /var/lib/$PKG" test "$(cut -d: -f6 <<<"$pw")" = "/var/lib/$PKG"
check "user is a system user (uid < 1000)" test -n "$uid" -a "${uid:-1000}" -lt 1000
check "/var/lib/$PKG is 0700 owned by $uid:$gid" test -d "$R/var/lib/$PKG" -a "$(mode "$R/var/lib/$PKG")" = 700 -a "$(owner "$R/var/lib/$PKG")" = "$uid:$gid"
check "/etc/$PKG is 0750 owned by 0:$gid" test "$(mode "$R/etc/$PKG")" = 750 -a "$(owner "$R/etc/$PKG")" = "0:$gid"
check "example config owned by 0:$gid" test "$(owner "$R/etc/$PKG/sensor.toml.example")" = "0:$gid"
check "dpkg --root -s: install ok installed" test "$(dpkg --root="$R" -s "$PKG" | sed -n 's/^Status: //p')" = "install ok installed"

# Idempotent: installing again keeps one user, one group, the same ids.
if dpkg_r --install "$DEB" > "$WORK/reinstall.log" 2>&1; then
    pass "dpkg --root --install again (upgrade path)"
else
    cat "$WORK/reinstall.log"
    fail "dpkg --root --install again"
fi
check "still exactly one user and one group after reinstall" \
    test "$(grep -c "^$PKG:" "$R/etc/passwd"):$(grep -c "^$PKG:" "$R/etc/group")" = "1:1"
check "ids unchanged after reinstall" test "$(owner "$R/var/lib/$PKG")" = "$uid:$gid"

# An agent's state survives removal and purge.
echo spooled > "$R/var/lib/$PKG/marker"
if dpkg_r --remove "$PKG" > "$WORK/remove.log" 2>&1; then
    pass "dpkg --root --remove"
else
    cat "$WORK/remove.log"
    fail "dpkg --root --remove"
fi
check "removed: binary and unit gone" test ! -e "$R/usr/bin/$PKG" -a ! -e "$R/lib/systemd/system/$PKG.service"
check "removed: conffile kept, status config-files" test -f "$R/etc/$PKG/sensor.toml.example" -a \
    "$(dpkg --root="$R" -s "$PKG" 2>/dev/null | sed -n 's/^Status: //p')" = "deinstall ok config-files"
if dpkg_r --purge "$PKG" > "$WORK/purge.log" 2>&1; then
    pass "dpkg --root --purge"
else
    cat "$WORK/purge.log"
    fail "dpkg --root --purge"
fi
check "purged: example config and empty /etc/$PKG gone" test ! -e "$R/etc/$PKG"
check "purged: package unknown to the scratch dpkg" bash -c '! dpkg --root="$1" -s "$2" >/dev/null 2>&1' _ "$R" "$PKG"
check "purged: spool data and user kept" test -f "$R/var/lib/$PKG/marker" -a -n "$(grep "^$PKG:" "$R/etc/passwd")"

# ---- the host was not touched --------------------------------------------------------------------------
check "host /etc/passwd and /etc/group unchanged" test "$(cat /etc/passwd /etc/group | sha256sum)" = "$host_users_before"
check "host dpkg database: $PKG status unchanged" test "$(dpkg-query -W -f='${Status}' "$PKG" 2>/dev/null || true)" = "$host_installed_before"

finish
