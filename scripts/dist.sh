#!/usr/bin/env bash
# Builds the static appliance binaries of m365-sensor for x86_64 and aarch64 (musl) into dist/bin/:
#   dist/bin/m365-sensor-x86_64, dist/bin/m365-sensor-aarch64, dist/bin/SHA256SUMS
# The appliance build leaves out the demo's embedded test rigs (--no-default-features). The release profile
# already strips symbols. The cross settings (linker, C compiler for ring and zstd-sys) are in
# .cargo/config.toml.
#
# Installs nothing: it checks for what it needs and prints the exact apt-get/rustup commands if something is
# missing. Fails if a binary is not statically linked or is for the wrong architecture.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=m365-sensor
OUT=dist/bin
# arch suffix -> rust target triple, ELF machine (as readelf -h prints it)
ARCHS=(x86_64 aarch64)
declare -A TRIPLE=([x86_64]=x86_64-unknown-linux-musl [aarch64]=aarch64-unknown-linux-musl)
declare -A MACHINE=([x86_64]="Advanced Micro Devices X86-64" [aarch64]="AArch64")

die() { echo "dist: $*" >&2; exit 1; }

# ---- prerequisites -------------------------------------------------------------------------------------
missing_apt=()
missing_targets=()
need_cmd() { # command, Debian package providing it
    command -v "$1" >/dev/null 2>&1 || missing_apt+=("$2")
}
command -v cargo >/dev/null 2>&1 || die "cargo not found: install the Rust toolchain (https://rustup.rs)"
need_cmd musl-gcc musl-tools                   # C compiler for ring/zstd-sys on x86_64-unknown-linux-musl
need_cmd aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu   # linker + C compiler for aarch64-unknown-linux-musl
need_cmd aarch64-linux-gnu-ar binutils-aarch64-linux-gnu
need_cmd readelf binutils
need_cmd file file
need_cmd sha256sum coreutils
# zstd-sys's C includes libc headers; the aarch64 cross compiler finds them in libc6-dev-arm64-cross.
[ -e /usr/aarch64-linux-gnu/include/stdlib.h ] || missing_apt+=(libc6-dev-arm64-cross)

sysroot=$(rustc --print sysroot)
for a in "${ARCHS[@]}"; do
    t=${TRIPLE[$a]}
    [ -d "$sysroot/lib/rustlib/$t/lib" ] || missing_targets+=("$t")
done

if [ ${#missing_apt[@]} -gt 0 ] || [ ${#missing_targets[@]} -gt 0 ]; then
    echo "dist: missing build prerequisites; install them with:" >&2
    if [ ${#missing_apt[@]} -gt 0 ]; then
        # de-duplicate, keep order
        pkgs=$(printf '%s\n' "${missing_apt[@]}" | awk '!seen[$0]++' | tr '\n' ' ')
        echo "  apt-get install -y --no-install-recommends ${pkgs% }" >&2
    fi
    if [ ${#missing_targets[@]} -gt 0 ]; then
        echo "  rustup target add ${missing_targets[*]}" >&2
    fi
    exit 1
fi

# ---- build ---------------------------------------------------------------------------------------------
version=$(cargo pkgid --offline -p "$PKG" | sed 's/.*[#@]//')
target_dir=$(cargo metadata --offline --no-deps --format-version 1 | sed 's/.*"target_directory":"\([^"]*\)".*/\1/')
[ -d "$target_dir" ] || mkdir -p "$target_dir"
mkdir -p "$OUT"

declare -A SECS
for a in "${ARCHS[@]}"; do
    t=${TRIPLE[$a]}
    echo "dist: building $PKG $version for $t"
    start=$(date +%s.%N)
    cargo build --release --locked -p "$PKG" --no-default-features --target "$t"
    end=$(date +%s.%N)
    SECS[$a]=$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }')

    src="$target_dir/$t/release/$PKG"
    [ -f "$src" ] || die "expected $src after the build"
    dst="$OUT/$PKG-$a"
    install -m 0755 "$src" "$dst.tmp"
    mv -f "$dst.tmp" "$dst"

    # Statically linked: no program interpreter and no NEEDED entries (a static-pie has a dynamic section but
    # needs nothing). `file` must agree ("statically linked" or "static-pie linked").
    desc=$(file -b "$dst")
    if readelf -lW "$dst" | grep -q 'Requesting program interpreter\|[[:space:]]INTERP[[:space:]]'; then
        die "$dst has a program interpreter (dynamically linked): $desc"
    fi
    if readelf -dW "$dst" | grep -q '(NEEDED)'; then
        die "$dst needs shared libraries: $(readelf -dW "$dst" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ';')"
    fi
    case "$desc" in
        *"statically linked"* | *"static-pie linked"*) ;;
        *) die "file does not call $dst statically linked: $desc" ;;
    esac
    machine=$(readelf -hW "$dst" | sed -n 's/^ *Machine: *//p')
    [ "$machine" = "${MACHINE[$a]}" ] || die "$dst is for '$machine', expected '${MACHINE[$a]}'"
    echo "dist: $dst: $desc"
done

(cd "$OUT" && sha256sum "${ARCHS[@]/#/$PKG-}" > SHA256SUMS)

# ---- summary -------------------------------------------------------------------------------------------
echo
echo "dist: $PKG $version, static (musl), stripped, without the demo rigs:"
for a in "${ARCHS[@]}"; do
    dst="$OUT/$PKG-$a"
    bytes=$(stat -c %s "$dst")
    mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
    printf '  %-28s %10s bytes  %6s MiB  (built in %s s)\n' "$dst" "$bytes" "$mib" "${SECS[$a]}"
done
echo "  $OUT/SHA256SUMS"
sed 's/^/    /' "$OUT/SHA256SUMS"
