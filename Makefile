# Two entry points a new user needs: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint format gpu-check gpu-science

setup:
	launch/setup_env.sh all

demo: setup
	.venv/bin/vbon demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .

format: setup
	.venv/bin/ruff format .

# On one NVIDIA GPU: kernel tests with Triton compiled, the CUDA log-prob benchmark, a Pythia-1B-shaped PPO
# run on ZeRO-3 and HF vs vLLM generation on that model; writes runs/gpu_check/RESULTS_block.md for
# benchmarks/RESULTS.md.
gpu-check:
	@command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found); run it on a machine with one" >&2; exit 2; }
	$(MAKE) setup
	$(PY) benchmarks/gpu_check.py

# On one NVIDIA GPU, at most 10 minutes by its own estimate: launch/sweep_science.yaml (SmolLM2-135M + VADER,
# 13 runs of 6 methods, M = 64, 1024 answers per step); calibrates on the card, refuses when its estimate is
# over 10 minutes, writes runs/sweep_science/RESULTS_block.md (frontier table, front counts, figure, card).
gpu-science:
	@command -v nvidia-smi >/dev/null 2>&1 || { echo "gpu-science: no NVIDIA GPU here (nvidia-smi not found); run it on a machine with one, or python benchmarks/gpu_science.py --size laptop on CPU" >&2; exit 2; }
	$(MAKE) setup
	$(PY) benchmarks/gpu_science.py
