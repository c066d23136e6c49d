#!/usr/bin/env bash
# The official OpenAI Python client (PyPI `openai`) for tests/serve.rs's real-client test and
# scripts/bench_serve.sh: in a venv, or (where python3 has no venv module) installed with
# `pip --target` behind a small wrapper. Idempotent; prints the python to use (TERN_OPENAI_PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/openai-client
py=$PWD/$dir/python
if ! "$py" -c "import openai" 2>/dev/null; then
  rm -rf "$dir"
  mkdir -p "$dir"
  if python3 -m venv "$dir/venv" >/dev/null 2>&1; then
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check openai >&2
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$PWD/$dir/venv/bin/python" > "$py"
    chmod +x "$py"
  else
    python3 -m pip install --quiet --disable-pip-version-check --target "$dir/site" openai >&2
    printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec python3 "$@"\n' "$PWD/$dir/site" > "$py"
    chmod +x "$py"
  fi
fi
"$py" -c "import openai" >&2
echo "$py"
