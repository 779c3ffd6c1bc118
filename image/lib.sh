# Shared by image/build.sh, image/bundle.sh, provision/* and tests/image: the layout (image/LAYOUT.md) and
# small helpers. Source it; it defines functions and IMAGE_DIR only.
IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "${0##*/}: $*" >&2; exit 1; }
note() { echo "${0##*/}: $*" >&2; }

# layout_rows: prints "num label type size_mib" for each partition of image/LAYOUT.md's layout block.
layout_rows() {
    awk '/^```layout$/ { on = 1; next } /^```$/ { on = 0 } on && !/^#/ && NF >= 4 { print $1, $2, $3, $4 }' \
        "$IMAGE_DIR/LAYOUT.md"
}

# layout_field LABEL FIELD: num | type | size_mib of the partition named LABEL.
layout_field() {
    local col
    case "$2" in num) col=1 ;; type) col=3 ;; size_mib) col=4 ;; *) die "layout_field: unknown field $2" ;; esac
    layout_rows | awk -v l="$1" -v c="$col" '$2 == l { print $c; found = 1 } END { exit !found }' \
        || die "image/LAYOUT.md has no partition '$1'"
}

# layout_start_mib LABEL: the partition's first MiB (partitions follow each other from 1 MiB).
layout_start_mib() {
    layout_rows | awk -v l="$1" 'BEGIN { s = 1 } $2 == l { print s; found = 1; exit } { s += $4 } END { exit !found }' \
        || die "image/LAYOUT.md has no partition '$1'"
}

# layout_disk_mib: the whole disk, with 1 MiB before the first partition and 1 MiB for the backup GPT.
layout_disk_mib() {
    layout_rows | awk 'BEGIN { s = 2 } { s += $4 } END { print s }'
}

# type_guid TYPE ARCH: the GPT type GUID of a layout type (table in image/LAYOUT.md).
type_guid() {
    case "$1:$2" in
        esp:*) echo C12A7328-F81F-11D2-BA4B-00A0C93EC93B ;;
        xbootldr:*) echo BC13C2FF-59E6-4262-A352-B275FD6F7172 ;;
        var:*) echo 4D21B016-B534-45C2-A9FB-5C16E091FD2D ;;
        root:x86_64) echo 4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709 ;;
        root-verity:x86_64) echo 2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5 ;;
        root:aarch64) echo B921B045-1DF0-41C3-AF44-4C6F280D3FAE ;;
        root-verity:aarch64) echo DF3300CE-D69F-4C92-978C-9BFB0F38D820 ;;
        *) die "no GPT type GUID for '$1' on '$2'" ;;
    esac
}

# gpt_partition_offset IMAGE LABEL: byte offset and size of the partition named LABEL in a disk image or
# device, read from its GPT (not from the layout: the disk may come from an older layout).
gpt_partition_offset() {
    local img=$1 label=$2 json
    json=$(sfdisk -J "$img") || die "$img: no readable partition table"
    python3 - "$label" "$json" <<'PY'
import json, sys
label, doc = sys.argv[1], json.loads(sys.argv[2])
pt = doc["partitiontable"]
ss = pt.get("sectorsize", 512)
for p in pt["partitions"]:
    if p.get("name") == label:
        print(p["start"] * ss, p["size"] * ss)
        sys.exit(0)
sys.exit(1)
PY
}

# elapsed START: seconds since START (from date +%s.%N), one decimal.
elapsed() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }'; }
