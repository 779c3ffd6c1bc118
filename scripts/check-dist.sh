#!/usr/bin/env bash
# Checks the static binaries that scripts/dist.sh left in dist/bin/: the x86_64 one runs natively, the
# aarch64 one under qemu-user (qemu-aarch64-static called directly, so binfmt_misc is not needed). Each must
# print `m365-sensor <workspace version>` for --version and reject a tiny invalid configuration through
# `check-config` (exit 1, an error naming the file and the problem). Ends with "N passed, M failed";
# exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/.."

PKG=m365-sensor
OUT=dist/bin
QEMU=${QEMU_AARCH64:-qemu-aarch64-static}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok    $*"; }
bad() { failed=$((failed + 1)); echo "FAIL  $*"; }
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

if [ -z "${VERSION:-}" ]; then
    if command -v cargo >/dev/null 2>&1; then
        VERSION=$(cargo pkgid --offline -p "$PKG" 2>/dev/null | sed 's/.*[#@]//')
    fi
    if [ -z "${VERSION:-}" ]; then # no cargo: the workspace version
        VERSION=$(awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 }
                       p && $1 == "version" { gsub(/"/, "", $3); print $3; exit }' Cargo.toml)
    fi
fi
[ -n "$VERSION" ] || { bad "cannot determine the workspace version"; finish; }
echo "checking $OUT against $PKG $VERSION"

if ! command -v "$QEMU" >/dev/null 2>&1; then
    bad "$QEMU not found: apt-get install -y --no-install-recommends qemu-user-static"
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A configuration that parses but is invalid (plain-http backend, missing token file) and one with an
# unknown key: the validation path and the strict parser.
invalid="$tmp/invalid.toml"
printf '[backend]\nurl = "http://backend.invalid"\ntoken_file = "%s/missing-token"\n' "$tmp" > "$invalid"
unknown="$tmp/unknown-key.toml"
printf '[backend]\nurl = "https://backend.invalid"\ntoken_file = "/t"\nbogus_key = 1\n' > "$unknown"

if [ -f "$OUT/SHA256SUMS" ] && (cd "$OUT" && sha256sum --quiet -c SHA256SUMS) >"$tmp/sums" 2>&1; then
    ok "SHA256SUMS matches the binaries"
else
    bad "SHA256SUMS missing or not matching (run scripts/dist.sh): $(tr '\n' ' ' <"$tmp/sums" 2>/dev/null)"
fi

for arch in x86_64 aarch64; do
    bin="$OUT/$PKG-$arch"
    case $arch in
        x86_64) run=(); machine="Advanced Micro Devices X86-64" ;;
        aarch64) run=("$QEMU"); machine="AArch64" ;;
    esac
    if [ ! -x "$bin" ]; then
        bad "$arch: $bin missing (run scripts/dist.sh)"
        continue
    fi
    if [ "$arch" = aarch64 ] && ! command -v "$QEMU" >/dev/null 2>&1; then
        bad "$arch: cannot run without $QEMU"
        continue
    fi

    # the right architecture, statically linked (what runs below is what ships)
    got=$(readelf -hW "$bin" 2>/dev/null | sed -n 's/^ *Machine: *//p')
    if [ "$got" = "$machine" ] && ! readelf -dW "$bin" 2>/dev/null | grep -q '(NEEDED)' \
        && ! readelf -lW "$bin" 2>/dev/null | grep -q 'program interpreter'; then
        ok "$arch: $got ELF, statically linked ($(stat -c %s "$bin") bytes)"
    else
        bad "$arch: expected a static $machine ELF, got machine '$got': $(file -b "$bin" 2>/dev/null)"
    fi

    # --version
    out=$(timeout "$RUN_TIMEOUT" "${run[@]}" "$bin" --version 2>"$tmp/err")
    rc=$?
    if [ $rc -eq 0 ] && [ "$out" = "$PKG $VERSION" ]; then
        ok "$arch: ${run[*]:+${run[*]} }$bin --version -> '$out'"
    else
        bad "$arch: --version exit $rc, stdout '$out' (want '$PKG $VERSION'), stderr: $(head -c 500 "$tmp/err")"
    fi

    # check-config on an invalid configuration: exit 1, the file and the problems named
    timeout "$RUN_TIMEOUT" "${run[@]}" "$bin" check-config --config "$invalid" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ $rc -eq 1 ] && grep -qF "$invalid" "$tmp/err" && grep -qF "backend.url" "$tmp/err" \
        && grep -qF "missing-token" "$tmp/err"; then
        ok "$arch: check-config rejects an invalid config (exit 1, names the file, backend.url, token_file)"
    else
        bad "$arch: check-config invalid config: exit $rc (want 1), stderr: $(head -c 800 "$tmp/err")"
    fi

    timeout "$RUN_TIMEOUT" "${run[@]}" "$bin" check-config --config "$unknown" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ $rc -eq 1 ] && grep -qF "$unknown" "$tmp/err" && grep -qF "bogus_key" "$tmp/err"; then
        ok "$arch: check-config rejects an unknown key (exit 1, names the file and bogus_key)"
    else
        bad "$arch: check-config unknown key: exit $rc (want 1), stderr: $(head -c 800 "$tmp/err")"
    fi
done

finish
