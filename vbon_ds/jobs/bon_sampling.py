"""`vbon bon`: the Best-of-N sampling baseline, straight from the reference cache (no model is run).

For every evaluation prompt, the best of the first N cached reference answers (ties: the earliest) is
written to eval/bon_n{N}.jsonl; the report compares its mean reward with the unbiased BoN(N) estimate
over all N-subsets of the M cached answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from vbon_ds.config import ExperimentConfig
from vbon_ds.core import bon
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.refcache import open_refcache
from vbon_ds.errors import VbonError, writing


def run(cfg: ExperimentConfig) -> Path:
    """Write the BoN(N) answers of the evaluation prompts and print their mean reward."""
    n = cfg.vbon.n
    cache = open_refcache(cfg)
    if n > cache.m:
        raise VbonError(
            f"vbon.n: BoN({n}) needs at least N cached answers per prompt, the cache has M={cache.m}"
        )
    ids = load_prompts(cfg.data, "eval").ids
    out = Path(cfg.train.output_dir) / "eval" / f"bon_n{n}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    picked = []
    with writing(out), out.open("w", encoding="utf-8") as f:
        for pid in ids:
            record = cache.record(pid)
            best = record.best_of(n)
            picked.append(record.rewards[best])
            row = {
                "prompt_id": pid,
                "prompt": record.prompt,
                "response": record.texts[best],
                "reward": picked[-1],
            }
            f.write(json.dumps(row) + "\n")
    estimate = bon.expected_bon_reward(cache.rewards_for(ids).double(), n).mean().item()
    print(
        f"BoN({n}) on {len(ids)} evaluation prompts: mean reward {sum(picked) / len(picked):.4f} "
        f"(first {n} draws), {estimate:.4f} (unbiased over all {n}-subsets of M={cache.m}); answers in {out}"
    )
    return out
