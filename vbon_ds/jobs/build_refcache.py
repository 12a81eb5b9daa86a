"""`vbon refcache`: M reference answers per training and evaluation prompt, scored, stored on disk.

    prompts (train + eval) -> drop the ones already cached -> shard over ranks
      -> per chunk: pi_ref samples M answers per prompt -> reward -> one record per prompt -> parquet shard
    -> validate: every prompt has M finite rewards

Resumable: shards appear only when complete, and a rerun skips the prompts they hold.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from vbon_ds.algorithms.rollout import response_token_ids, sample_and_score, shard_evenly
from vbon_ds.config import ExperimentConfig
from vbon_ds.data.prompts import PromptSet
from vbon_ds.data.refcache import (
    CacheSummary,
    RefCacheWriter,
    RefRecord,
    done_prompt_ids,
    prompt_texts,
    refcache_dir,
    validate_cache,
)
from vbon_ds.data.refcache_fingerprint import cache_fingerprint, local_cache_fingerprint
from vbon_ds.engines import distributed
from vbon_ds.engines.build import build_engines
from vbon_ds.errors import VbonError
from vbon_ds.models.loading import check_models_fit
from vbon_ds.runlock import prepare_output_dir, run_lock


def all_prompts(cfg: ExperimentConfig) -> PromptSet:
    """Training and evaluation prompts together (an id in both is cached once)."""
    texts = prompt_texts(cfg)
    return PromptSet(split="all", ids=list(texts), texts=list(texts.values()))


def part_indices(num_prompts: int, part: tuple[int, int]) -> range:
    """Prompt indices of part i of n: the i-th of n contiguous blocks (a Slurm job-array task's share)."""
    index, parts = part
    return range(index * num_prompts // parts, (index + 1) * num_prompts // parts)


def run(cfg: ExperimentConfig, part: tuple[int, int] = (0, 1)) -> CacheSummary:
    """Fill (or complete) the reference cache of this config and validate it.

    `part=(i, n)` does only part i of n of the prompts (tasks of a job array, possibly running at once);
    a last run without it fills any gap and validates the whole cache.
    """
    distributed.init_distributed()
    # Also checks the directory before any work. Job-array parts run side by side, each part once.
    share = f"refcache-part-{part[0]}-of-{part[1]}" if part[1] > 1 else ""
    command = f"vbon refcache --part {part[0]}/{part[1]}" if share else "vbon refcache"
    with run_lock(cfg.train.output_dir, command, share):
        prepare_output_dir(refcache_dir(cfg), "train.refcache_dir")
        check_models_fit(cfg)
        return _fill(cfg, part)


def _fill(cfg: ExperimentConfig, part: tuple[int, int]) -> CacheSummary:
    # Writers of concurrent parts need distinct shard names and random streams.
    writer_id = part[0] * distributed.world_size() + distributed.rank()
    torch.manual_seed(cfg.train.seed + 1000 * writer_id)
    root = refcache_dir(cfg)
    prompts = all_prompts(cfg)
    share = part_indices(len(prompts.ids), part)
    m = cfg.vbon.num_ref_samples
    # A hub model not downloaded yet has no known content: loading it downloads it. Ranks decide together,
    # so that all of them build the engines (collectives) or none.
    engines, fingerprint = None, local_cache_fingerprint(cfg)  # the digests read once
    if not all(distributed.all_gather_object(fingerprint is not None)):
        engines = build_engines(cfg, reference=True, scorer=True)
        fingerprint = cache_fingerprint(cfg)
    # The writer checks the fingerprint before anything is sampled; then every rank sees the same done set.
    writer = RefCacheWriter(
        root,
        fingerprint,
        rank=writer_id,
        chunk_size=cfg.train.refcache_shard_prompts,
    )
    distributed.barrier()
    done = done_prompt_ids(root, dict(zip(prompts.ids, prompts.texts, strict=True)))
    todo = [i for i in share if prompts.ids[i] not in done]
    mine, real = shard_evenly(todo, distributed.rank(), distributed.world_size())
    expected = {prompts.ids[i]: prompts.texts[i] for i in share}
    if not todo:  # a rerun of a complete cache, or the merge job after a job array: no model to load
        return _validated(root, expected, part)

    engines = engines or build_engines(cfg, reference=True, scorer=True)
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
                engines.sampler("reference"),
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
    return _validated(root, expected, part)


def _validated(root: Path, expected: dict[str, str], part: tuple[int, int]) -> CacheSummary:
    """Validate the cache holds `expected` (id -> prompt text) and report it: one rank validates, the others
    wait and read its verdict."""
    summary = distributed.from_main(lambda: validate_cache(root, expected_ids=expected))
    if distributed.is_main():
        of_part = f" (part {part[0]}/{part[1]}: {len(expected)} prompts)" if part[1] > 1 else ""
        print(f"refcache: {summary.num_prompts} prompts x M={summary.num_ref_samples} in {root}{of_part}")
    return summary
