#!/usr/bin/env bash
# Fetches real English text for perplexity checks: Jane Austen's six novels from Debian's
# r-cran-janeaustenr package (R lazy-load data), unpacked to plain text in a cache folder
# outside the repo. Prints the folder; Pride and Prejudice is prideprejudice.txt there.
set -euo pipefail
cache="${HOPSCOTCH_CACHE:-$HOME/.cache/hopscotch}"
out="$cache/text"
if [ -s "$out/prideprejudice.txt" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$out" "$cache/debs"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! ls "$cache"/debs/r-cran-janeaustenr_*.deb >/dev/null 2>&1; then
    # a fresh machine may have no package lists yet
    (cd "$cache/debs" && { apt-get download r-cran-janeaustenr >&2 2>/dev/null \
        || { apt-get update -qq >&2 && apt-get download r-cran-janeaustenr >&2; }; })
fi
dpkg -x "$(ls "$cache"/debs/r-cran-janeaustenr_*.deb | head -n 1)" "$tmp"
python3 - "$tmp/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" "$out" <<'PY'
# An R lazy-load database is a run of [u32 big-endian length][zlib stream] records, each an
# R serialization (XDR) of one object; each novel is a character vector (STRSXP, type 16) of
# lines, each line a CHARSXP: u32 flags, i32 length, bytes.
import os, struct, sys, zlib
data = open(sys.argv[1], "rb").read()
names = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
i, objs = 0, []
while i < len(data):
    z = zlib.decompressobj()
    out = z.decompress(data[i + 4:])
    objs.append(out)
    i += 4 + len(data[i + 4:]) - len(z.unused_data)
if len(objs) != len(names):
    sys.exit(f"fetch-text: expected {len(names)} novels in {sys.argv[1]}, found {len(objs)}")
for name, b in zip(names, objs):
    if b[:2] != b"X\n":
        sys.exit(f"fetch-text: {name}: not an XDR serialization")
    j = 14
    while struct.unpack(">I", b[j:j + 4])[0] & 0xFF != 16:
        j += 1
    n = struct.unpack(">I", b[j + 4:j + 8])[0]
    j += 8
    lines = []
    for _ in range(n):
        _, ln = struct.unpack(">Ii", b[j:j + 8])
        j += 8
        if ln < 0:
            lines.append("")
            continue
        lines.append(b[j:j + ln].decode("utf-8"))
        j += ln
    path = os.path.join(sys.argv[2], name + ".txt")
    with open(path + ".part", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".part", path)
PY
echo "$out"
