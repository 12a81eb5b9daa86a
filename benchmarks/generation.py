"""Rollout throughput under ZeRO-3: parameters gathered once per generate call vs synced per-layer gathering.

    python benchmarks/generation.py [--ranks 2] [--layers 8] [--width 512] [--batch 2 8] [--new-tokens 32]

Launches itself with torchrun on `--ranks` processes (CPU: gloo) when started without a launcher. A random
Llama-style model (vbon_ds/models/tiny_models.py) is sharded with ZeRO-3; every rank samples `--batch`
prompts of 16 tokens
(for each batch size given) with exactly `--new-tokens` new tokens (min = max, so both modes do identical
work). Rank 0 prints a markdown table of generated tokens per second over all ranks (best of `--repeats`
timed calls after one warm-up).
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


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8], help="prompts per rank")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", default="", help="(set by the launcher) where the random model is")
    return parser.parse_args()


def _launch(args: argparse.Namespace) -> None:
    from vbon_ds.engines.distributed import free_port
    from vbon_ds.models.tiny_models import make_tiny_causal_lm

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_causal_lm(tmp, "llama", n_layer=args.layers, width=args.width)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks)]
        cmd += ["--master_port", str(free_port()), __file__, *sys.argv[1:], "--model-dir", tmp]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True)


def _bench(args: argparse.Namespace) -> None:
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


if __name__ == "__main__":
    arguments = _args()
    if arguments.model_dir:
        _bench(arguments)
    else:
        _launch(arguments)
