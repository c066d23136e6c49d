#!/usr/bin/env bash
# A held-out text of general English prose that is not FOLDOC, for measuring what general
# ability a fine-tune on FOLDOC keeps: the "people" and "wisdom" quotation files of Debian's
# `fortunes` package (quotations from literature, essays and speeches), quotes separated by blank
# lines, the first 120,000 bytes:
#   data/english.txt
# Cached: a second run fetches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=data/english.txt
if [[ -s $out ]]; then echo "english: $out exists"; exit 0; fi
command -v apt-get >/dev/null || { echo "error: need apt-get for Debian's fortunes package" >&2; exit 1; }
mkdir -p data
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download fortunes >/dev/null 2>&1); then
  apt-get update -qq >/dev/null 2>&1 || true
  (cd "$tmp" && apt-get download fortunes >/dev/null)
fi
dpkg-deb -x "$tmp"/fortunes_*.deb "$tmp/f"
python3 - "$tmp/f/usr/share/games/fortunes" "$out.part" <<'PY'
import sys
from pathlib import Path
src, out = Path(sys.argv[1]), sys.argv[2]
quotes = []
for name in ("people", "wisdom"):
    text = (src / name).read_text(encoding="utf-8", errors="replace")
    quotes += [q.strip("\n") for q in text.split("\n%\n") if q.strip()]
body = "\n\n".join(quotes) + "\n"
body = body.encode("utf-8")[:120_000].decode("utf-8", errors="ignore")
Path(out).write_text(body[: body.rfind("\n\n") + 2], encoding="utf-8")
PY
mv "$out.part" "$out"
echo "english: $out ($(wc -c < "$out") bytes, Debian fortunes: people, wisdom)"
