"""The GPU check (`make gpu-check`, one GPU; not yet timed with its vllm part): what CPU tests cannot show.

    python benchmarks/gpu_check.py                      # everything; prints and writes the markdown block
    python benchmarks/gpu_check.py --only model --steps 3 --out runs/gpu_check/block.md

1. kernels: tests/test_kernels.py on CUDA with the Triton kernels compiled (TRITON_INTERPRET unset).
2. logprobs: the CUDA cases of benchmarks/logprobs.py (one round; Liger's kernel where installed; the
   card's copy bandwidth).
3. model: a random model of Pythia-1B's shape (GPT-NeoX, 16 layers x 2048) as actor, critic, reference and
   reward on ZeRO-3: `vbon refcache`, then `vbon train` for --steps PPO steps, with time per phase (the
   trainer's TensorBoard scalars), peak GPU memory per stage, and `vbon plan`'s estimate for this card
   beside it (sampler: --engine, vllm by default, as generation.engine=auto takes on a GPU).
4. vllm: benchmarks/generation.py on the same Pythia-1B-shaped model, frozen on ZeRO-3, bf16: HF generate
   vs vLLM tokens/s on refcache- and rollout-shaped batches (8 x the CPU benchmark's prompts), vLLM's start
   and its first weight push from the ZeRO-3 engine (gathered layer by layer).

The block it writes is meant to be appended to benchmarks/RESULTS.md with the card and date it names.
Without a CUDA device it stops at once with exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("kernels", "logprobs", "model", "vllm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=PARTS, action="append", help="run only this part (repeatable)")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps of the Pythia-1B-shaped run")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm", help="the PPO run's sampler")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check" / "RESULTS_block.md")
    parser.add_argument(
        "--workdir", type=Path, help="models and run outputs (default: a temporary directory)"
    )
    return parser.parse_args(argv)


def require_cuda(tool: str = "gpu-check", instead: str = "") -> None:
    """Exit 2 with one line naming `tool` when there is no CUDA device (`instead`: what to run then)."""
    import torch

    if not torch.cuda.is_available():
        print(
            f"{tool}: no CUDA device (torch.cuda.is_available() is False, torch {torch.__version__}); run it "
            f"on a machine with an NVIDIA GPU and a CUDA build of torch{instead}",
            file=sys.stderr,
        )
        sys.exit(2)


def model_check_overrides(workdir: Path, steps: int, engine: str = "vllm") -> list[str]:
    """The experiment of the model check: Pythia-1B-shaped actor and reward model, PPO on ZeRO-3, rollouts
    sampled by `engine` (named, not auto: the memory plan beside the measurement assumes the same one)."""
    from vbon_ds.data.prompts import DEMO_PROMPTS

    return [
        f"model.actor={workdir / 'actor'}",
        f"reward.model={workdir / 'reward'}",
        "model.critic_init=reward",
        "model.gradient_checkpointing=true",
        f"data.source={DEMO_PROMPTS}",
        "data.eval_split=validation",
        "data.max_prompt_tokens=64",
        "vbon.num_ref_samples=8",
        "algo.name=ppo",
        "generation.max_new_tokens=50",
        "generation.batch_size=64",
        f"generation.engine={engine}",
        f"train.steps={steps}",
        "train.prompts_per_step=16",
        "train.micro_batch_size=8",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        f"train.output_dir={workdir / 'run'}",
        "deepspeed.config=zero3",
        "deepspeed.force_stage=true",  # ZeRO-3 itself, although one GPU alone would run stage 0
        "logging.progress_bar=false",
    ]


def pythia_1b_config(eos_id: int):
    """A GPT-NeoX config of Pythia-1B's shape (vbon plan's table) with `eos_id` as BOS/EOS/pad."""
    from vbon_ds.engines.memory_plan import pythia_config

    config = pythia_config("pythia-1b")
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_id
    return config


def make_models(workdir: Path) -> None:
    """Random Pythia-1B-shaped causal LM and 1-output classifier, bf16, with a small BPE tokenizer (ids the
    tokenizer does not know decode to nothing, so random samples still become text for the reward model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from vbon_ds.models.tiny_models import make_tiny_tokenizer

    for name, auto in (("actor", AutoModelForCausalLM), ("reward", AutoModelForSequenceClassification)):
        tok = make_tiny_tokenizer(workdir / name, vocab_size=1000)
        config = pythia_1b_config(tok.eos_token_id)
        config.num_labels = 1  # the reward model's single score (unused by the causal LM)
        torch.manual_seed(0)
        auto.from_config(config, dtype=torch.bfloat16).save_pretrained(str(workdir / name))


def run_kernel_tests() -> tuple[str, bool]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DS_ACCELERATOR")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_kernels.py", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    verdict = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    line = (
        f"- Kernel tests on CUDA, Triton compiled (`pytest tests/test_kernels.py`): {verdict}: `{summary}` "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return line, proc.returncode == 0


def run_benchmark(command: list[str], what: str, out: Path | None = None) -> tuple[str, bool]:
    """A markdown item with `command`'s table: its stdout, or the `out` file it writes when given."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        return (
            f"- `{' '.join(command[1:])}` FAILED (exit {proc.returncode}):\n\n"
            f"```\n{proc.stderr[-2000:]}\n```",
            False,
        )
    table = out.read_text(encoding="utf-8") if out else proc.stdout
    return f"- `{' '.join(command[1:])}` ({what}):\n\n{table.strip()}", True


def run_logprobs_benchmark() -> tuple[str, bool]:
    return run_benchmark([sys.executable, "benchmarks/logprobs.py", "--rounds", "1"], "the CUDA cases")


def vllm_benchmark_command(workdir: Path, out: Path) -> list[str]:
    """benchmarks/generation.py on the Pythia-1B-shaped actor, frozen on ZeRO-3 (the first weight push
    gathers it), bf16, batches 8 x the CPU benchmark's."""
    return [
        sys.executable, "benchmarks/generation.py", "--model", str(workdir / "actor"), "--dtypes", "bfloat16",
        "--scale", "8", "--set", "deepspeed.force_stage=true", "--set", "data.max_prompt_tokens=64",
        "--out", str(out),
    ]  # fmt: skip


def run_vllm_benchmark(workdir: Path) -> tuple[str, bool]:
    out = workdir / "generation.md"
    what = "Pythia-1B-shaped, ZeRO-3, bf16: HF generate vs vLLM, and vLLM's start and first weight push"
    return run_benchmark(vllm_benchmark_command(workdir, out), what, out)


def plan_line(cfg, card_gb: float) -> str:
    """`vbon plan`'s estimate for `cfg` at world size 1 on a card of `card_gb`, with its sampler's share."""
    from vbon_ds.algorithms.registry import training_memory_plan
    from vbon_ds.engines.memory_plan import GIB

    plan = training_memory_plan(cfg, world_size=1, gpu_memory_gb=card_gb)
    vllm = f", of which vLLM {plan.vllm / GIB:.1f}" if plan.vllm else ""
    verdict = "fits" if plan.fits() else "does NOT fit"
    return (
        f"`vbon plan` for this config at world size 1 ({plan.sampler} sampler): {plan.total / GIB:.1f} GiB"
        f"{vllm}: {verdict} a {card_gb:.0f} GB card."
    )


def run_model_check(workdir: Path, steps: int, engine: str) -> str:
    import torch

    from vbon_ds.config import load_config
    from vbon_ds.engines.memory_plan import GIB
    from vbon_ds.jobs import build_refcache, train
    from vbon_ds.monitor import read_scalars

    cfg = load_config(None, model_check_overrides(workdir, steps, engine))
    rows = []
    for stage, run in (
        ("refcache", build_refcache.run),
        (f"train: build engines + {steps} PPO steps + save", train.run),
    ):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(cfg)
        torch.cuda.synchronize()
        rows.append(
            f"| {stage} | {time.perf_counter() - start:.1f} | {torch.cuda.max_memory_allocated() / GIB:.1f} |"
        )
    scalars = read_scalars(workdir / "run" / "tensorboard")
    per_step = [
        f"{tag} " + ", ".join(f"{v:.2f}" for _, v in scalars.get(tag, []))
        for tag in ("time/rollout", "time/weight_sync", "time/logprobs", "time/step")
        if tag in scalars
    ]
    card_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    return "\n".join(
        [
            "- Pythia-1B-shaped random model (GPT-NeoX 16 x 2048, 1.01B parameters) as actor, critic, "
            "reference and reward, ZeRO-3 on this one GPU, bf16, 16 prompts x 50 new tokens per step, "
            f"micro-batch 8, rollouts sampled by {engine}:",
            "",
            "| stage | seconds | peak GiB (max_memory_allocated) |",
            "|---|---|---|",
            *rows,
            "",
            f"  Seconds per step ({'; '.join(per_step)}). {plan_line(cfg, card_gb)}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda()
    import torch

    parts = args.only or list(PARTS)
    header = (
        f"## GPU check ({datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda})"
    )
    lines = [header, "", "`make gpu-check` (`python benchmarks/gpu_check.py`)."]
    ok = True
    for part, check in (("kernels", run_kernel_tests), ("logprobs", run_logprobs_benchmark)):
        if part in parts:
            line, passed = check()
            lines.append(line)
            ok = ok and passed
    if {"model", "vllm"} & set(parts):
        with tempfile.TemporaryDirectory(prefix="vbon_gpu_check_") as tmp:
            workdir = args.workdir or Path(tmp)
            make_models(workdir)
            if "model" in parts:  # an error here raises: the traceback is the report
                lines.append(run_model_check(workdir, args.steps, args.engine))
            if "vllm" in parts:  # in its own process: vLLM engines stay for the life of a process
                line, passed = run_vllm_benchmark(workdir)
                lines.append(line)
                ok = ok and passed
    block = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(block, encoding="utf-8")
    print(block)
    print(f"gpu-check: wrote {args.out}; append it to benchmarks/RESULTS.md")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
