"""`vbon refcache`: M reference answers per training and evaluation prompt, scored, stored on disk.

    prompts (train + eval) -> drop the ones already cached -> shard over ranks
      -> per chunk: pi_ref samples M answers per prompt -> reward -> one record per prompt -> parquet shard
    -> validate: every prompt has M finite rewards

Resumable: shards appear only when complete, and a rerun skips the prompts they hold.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from vbon_ds.config import ExperimentConfig
from vbon_ds.data import PromptSet, load_prompts
from vbon_ds.engines import distributed
from vbon_ds.errors import VbonError
from vbon_ds.pipelines.engines import build_engines
from vbon_ds.pipelines.rollout import response_token_ids, sample_and_score, shard_evenly
from vbon_ds.refcache import (
    CacheSummary,
    RefCacheWriter,
    RefRecord,
    done_prompt_ids,
    fingerprint_from_config,
    refcache_dir,
    validate_cache,
)


def all_prompts(cfg: ExperimentConfig) -> PromptSet:
    """Training and evaluation prompts together (an id in both is cached once)."""
    train, evaluation = load_prompts(cfg.data, "train"), load_prompts(cfg.data, "eval")
    seen: dict[str, str] = {}
    for pid, text in zip(train.ids + evaluation.ids, train.texts + evaluation.texts, strict=True):
        seen.setdefault(pid, text)
    return PromptSet(split="all", ids=list(seen), texts=list(seen.values()))


def run(cfg: ExperimentConfig) -> CacheSummary:
    """Fill (or complete) the reference cache of this config and validate it."""
    distributed.init_distributed()
    torch.manual_seed(cfg.train.seed + 1000 * distributed.rank())
    root = refcache_dir(cfg)
    prompts = all_prompts(cfg)
    m = cfg.vbon.num_ref_samples
    # The writer checks the fingerprint before anything is sampled; then every rank sees the same done set.
    writer = RefCacheWriter(
        root,
        fingerprint_from_config(cfg),
        rank=distributed.rank(),
        chunk_size=cfg.train.refcache_shard_prompts,
    )
    distributed.barrier()
    done = done_prompt_ids(root)
    todo = [i for i, pid in enumerate(prompts.ids) if pid not in done]
    mine, real = shard_evenly(todo, distributed.rank(), distributed.world_size())

    engines = build_engines(cfg, reference=True, scorer=True)
    # generation.batch_size counts answers per generate call; each prompt needs M of them.
    prompts_per_call = max(1, cfg.generation.batch_size // m)

    bar = tqdm(
        total=len(todo),
        desc=f"refcache ({len(done)} cached)",
        unit="prompt",
        disable=not distributed.is_main() or not cfg.logging.progress_bar,
    )
    with writer:
        for start in range(0, len(mine), prompts_per_call):
            chunk = mine[start : start + prompts_per_call]
            repeated = [prompts.texts[i] for i in chunk for _ in range(m)]
            scored = sample_and_score(
                engines.reference,
                engines.scorer,
                engines.tokenizer,
                repeated,
                cfg.generation,
                max_prompt_tokens=cfg.data.max_prompt_tokens,
            )
            token_ids = response_token_ids(scored.rollout)
            records = []
            for j, index in enumerate(chunk):
                if start + j >= real:  # padding work that keeps ranks' collectives matched
                    continue
                rows = slice(j * m, (j + 1) * m)
                rewards = scored.rewards[rows].tolist()
                if not torch.isfinite(scored.rewards[rows]).all():
                    raise VbonError(
                        f"reward is not finite for prompt {index} ({prompts.ids[index]!r}): {rewards}; "
                        "check the reward model or function"
                    )
                records.append(
                    RefRecord(
                        prompt_id=prompts.ids[index],
                        prompt=prompts.texts[index],
                        rewards=rewards,
                        token_ids=token_ids[rows],
                        texts=scored.responses[rows],
                    )
                )
            writer.add(records)
            bar.update(distributed.world_size() * len(records))
    bar.close()
    distributed.barrier()
    # One rank validates; the others wait and read its verdict.
    summary = validate_cache(root, expected_ids=prompts.ids) if distributed.is_main() else None
    summary = distributed.broadcast_object(summary)
    if distributed.is_main():
        print(f"refcache: {summary.num_prompts} prompts x M={summary.num_ref_samples} in {root}")
    return summary
