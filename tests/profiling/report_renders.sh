#!/usr/bin/env bash
# Renders a `spill report` page in headless Chromium: the screenshot must not be blank and the
# DOM must hold the expected labels. Exits 77 (CTest: skipped) when Chromium is missing.
# Usage: report_renders.sh TEST_PROFILING_BINARY WORK_DIR
set -euo pipefail
test_bin=$1
work=$2
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  echo "SKIP: chromium is not installed (scripts/setup.sh installs it)"
  exit 77
fi
mkdir -p "$work"
html=$work/report.html
SPILL_WRITE_REPORT=$html "$test_bin" --gtest_filter=Report.ShowsEverySection >/dev/null
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
       --disable-background-networking --disable-component-update --disable-sync
       --user-data-dir="$work/profile" --window-size=1100,1400)
timeout 120 "$browser" "${flags[@]}" --screenshot="$work/report.png" "file://$html" \
  >"$work/chromium.log" 2>&1 || { cat "$work/chromium.log"; exit 1; }
timeout 120 "$browser" "${flags[@]}" --dump-dom "file://$html" >"$work/dom.html" 2>>"$work/chromium.log"
for label in "Memory timeline" "Top allocations at peak" "Swap bandwidth" "Stalls" \
             "Fragmentation" "memory-timeline" "polyline" "step-marks" "id=\"steps\""; do
  grep -q "$label" "$work/dom.html" || { echo "FAIL: '$label' missing from the rendered DOM"; exit 1; }
done
python3 - "$work/report.png" <<'PY'
import struct, sys, zlib
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
pos, idat, width, height, bpp = 8, b"", 0, 0, 0
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b"IHDR":
        width, height, depth, colour = struct.unpack(">IIBB", body[:10])
        bpp = {2: 3, 6: 4}[colour] if depth == 8 else None
    elif kind == b"IDAT":
        idat += body
    pos += 12 + n
raw = zlib.decompress(idat)
stride = width * bpp
# Undo the PNG row filters to count distinct colours.
prev = bytearray(stride)
colours, non_white = set(), 0
for y in range(height):
    f = raw[y * (stride + 1)]
    row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if f == 1: row[i] = (row[i] + a) & 255
        elif f == 2: row[i] = (row[i] + b) & 255
        elif f == 3: row[i] = (row[i] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    if y % 4 == 0:
        for x in range(0, width, 4):
            px = bytes(row[x * bpp:x * bpp + 3])
            colours.add(px)
            non_white += px != b"\xff\xff\xff"
    prev = row
print(f"screenshot {width}x{height}: {len(colours)} colours, {non_white} sampled non-white pixels")
assert len(colours) > 8 and non_white > 500, "the screenshot is blank"
PY
echo "report renders in headless Chromium"
