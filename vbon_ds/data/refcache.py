"""On-disk cache of reference samples: per prompt, M answers drawn from pi_ref and their rewards.

Layout of `<output_dir>/refcache/`:
  fingerprint.json                what the samples depend on (the models' paths and content, generation, M,
                                  format version), written once the first shard is complete; see
                                  refcache_fingerprint.py, which makes, writes and checks it
  shard-rank{r}-{k:05d}.parquet   a chunk of prompts written by rank r; it appears only once complete and
                                  carries a hash of the fingerprint it was made under (checked on read)

Each record keeps the answers and their rewards in draw order (BoN sampling takes the best of the first N
draws; the offline baselines the best and the worst of random N-subsets) and the rewards sorted ascending,
the rank statistics behind log F_hat. Records keep their prompt text: a cache made for other texts under the
same prompt ids is refused when prompts are given to check against. This module only stores and reads: the
refcache pipeline samples and scores, partitions prompts across ranks, and skips `done_prompt_ids` on a
resumed run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vbon_ds.config import ExperimentConfig
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.refcache_fingerprint import (
    ANOTHER_CACHE,
    FINGERPRINT_FILE,
    cache_fingerprint,
    check_fingerprint,
    load_fingerprint,
    settings_hash,
    stored_fingerprint,
    write_fingerprint,
)
from vbon_ds.errors import VbonError, writing

SETTINGS_KEY = b"vbon_fingerprint_sha256"
SHARD_GLOB = "shard-rank*-*.parquet"
SHARD_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("rewards", pa.list_(pa.float32())),  # draw order, aligned with token_ids and texts
        ("sorted_rewards", pa.list_(pa.float32())),
        ("token_ids", pa.list_(pa.list_(pa.int32()))),
        ("texts", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class RefRecord:
    """The M reference answers to one prompt, in draw order."""

    prompt_id: str
    prompt: str
    rewards: list[float]
    """Reward of each answer."""
    token_ids: list[list[int]]
    """Response token ids of each answer (without the prompt)."""
    texts: list[str]
    """Decoded response of each answer."""

    def best_of(self, n: int) -> int:
        """Index of the highest-reward answer among the first `n` draws."""
        # Draws are i.i.d., so taking the earliest among tied answers is a uniform tie-break in distribution.
        return max(self._first(n), key=lambda i: (self.rewards[i], -i))

    def _first(self, n: int) -> range:
        if not 1 <= n <= len(self.rewards):
            raise ValueError(f"n must be in [1, {len(self.rewards)}], got {n}")
        return range(n)


@dataclass(frozen=True)
class CacheSummary:
    """What `validate_cache` found."""

    num_prompts: int
    num_ref_samples: int
    num_shards: int


def refcache_dir(cfg: ExperimentConfig) -> Path:
    """Where this experiment's reference cache lives: train.refcache_dir, else train.output_dir/refcache."""
    return Path(cfg.train.refcache_dir or Path(cfg.train.output_dir) / "refcache")


def prompt_texts(cfg: ExperimentConfig) -> dict[str, str]:
    """Training and evaluation prompts together, id -> text in source order (an id in both counts once)."""
    texts: dict[str, str] = {}
    for role in ("train", "eval"):
        prompts = load_prompts(cfg.data, role)
        for pid, text in zip(prompts.ids, prompts.texts, strict=True):
            texts.setdefault(pid, text)
    return texts


def open_refcache(cfg: ExperimentConfig) -> RefCache:
    """The experiment's cache for reading, refused when it was made under other settings, from models with
    other content, or for other prompts."""
    return RefCache(refcache_dir(cfg), cache_fingerprint(cfg), prompts=prompt_texts(cfg))


class RefCacheWriter:
    """Writes one rank's records, `chunk_size` prompts per parquet shard.

    A shard is written under a hidden temporary name and renamed when complete, so a crash leaves only whole
    shards behind. Used as a context manager, leaving it (also through an error) writes what is buffered.
    `fingerprint` must hold `num_ref_samples` (M); see `cache_fingerprint`.
    """

    def __init__(
        self, root: str | Path, fingerprint: Mapping[str, Any], *, rank: int = 0, chunk_size: int = 64
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.root, self.rank, self.chunk_size = Path(root), rank, chunk_size
        self.root.mkdir(parents=True, exist_ok=True)
        self._stored = stored_fingerprint(fingerprint)
        self.m: int = self._stored["num_ref_samples"]
        if (self.root / FINGERPRINT_FILE).exists():
            check_fingerprint(self.root, self._stored)
            self._stored = load_fingerprint(self.root)  # equal, and hashed as written (1 == 1.0)
        elif _shard_paths(self.root):
            # fingerprint.json was deleted: adopt the shards only if they were made under these settings.
            for path in _shard_paths(self.root):
                _read_shard(path, ["prompt_id"], settings_hash(self._stored))
            write_fingerprint(self.root, self._stored)
        # A crashed run of this rank may have left a partial shard; other ranks' files are not ours to touch.
        for partial in self.root.glob(f".shard-rank{rank}-*.tmp"):
            partial.unlink()
        taken = [int(p.stem.rsplit("-", 1)[1]) for p in self.root.glob(f"shard-rank{rank}-*.parquet")]
        self._next_shard = max(taken, default=-1) + 1
        self._buffer: list[RefRecord] = []

    def add(self, records: Iterable[RefRecord]) -> None:
        """Buffer complete records, writing a shard whenever `chunk_size` are waiting."""
        for record in records:
            problem = _record_problem(
                record.rewards, sorted(record.rewards), record.token_ids, record.texts, self.m
            )
            if problem:
                raise VbonError(f"reference answers for prompt {record.prompt_id!r}: {problem}")
            self._buffer.append(record)
            if len(self._buffer) >= self.chunk_size:
                self.flush()

    def flush(self) -> None:
        """Write the buffered records as one shard (nothing if the buffer is empty)."""
        if not self._buffer:
            return
        table = pa.Table.from_pylist(
            [{**asdict(r), "sorted_rewards": sorted(r.rewards)} for r in self._buffer],
            schema=SHARD_SCHEMA.with_metadata({SETTINGS_KEY: settings_hash(self._stored)}),
        )
        path = self.root / f"shard-rank{self.rank}-{self._next_shard:05d}.parquet"
        partial = self.root / f".{path.name}.tmp"
        with writing(path), partial.open("wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        self._next_shard += 1
        self._buffer = []
        if not (self.root / FINGERPRINT_FILE).exists():
            # Only now: a run that failed before its first shard leaves no trace.
            write_fingerprint(self.root, self._stored)

    def close(self) -> None:
        """Write what is buffered."""
        self.flush()

    def __enter__(self) -> RefCacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def done_prompt_ids(root: str | Path, prompts: Mapping[str, str] | None = None) -> set[str]:
    """Ids of the prompts already in complete shards (empty when there is no cache yet).

    With `prompts` (id -> text), a record cached for another text under one of those ids is refused.
    Partition the full prompt list across ranks first and then drop the done ids, so the assignment does
    not depend on when each rank looks.
    """
    root = Path(root)
    if not _shard_paths(root):
        return set()
    settings = settings_hash(load_fingerprint(root))
    done = set()
    for path in _shard_paths(root):
        table = _read_shard(path, ["prompt_id", "prompt"], settings)
        ids, texts = table["prompt_id"].to_pylist(), table["prompt"].to_pylist()
        _check_texts(root, path, ids, texts, prompts)
        done.update(ids)
    return done


class RefCache:
    """Read side: every prompt's sorted reference rewards in memory; answers read from their shard on demand.

    If a prompt id is in more than one shard (two runs wrote into one cache at once), the first shard in
    name order wins and a warning names both: either record is a valid draw from pi_ref.
    """

    def __init__(
        self,
        root: str | Path,
        fingerprint: Mapping[str, Any] | None = None,
        prompts: Mapping[str, str] | None = None,
    ):
        self.root = Path(root)
        stored = load_fingerprint(self.root)
        if fingerprint is not None:
            check_fingerprint(self.root, stored_fingerprint(fingerprint))
        self.m: int = stored["num_ref_samples"]
        self._settings = settings_hash(stored)
        self._index: dict[str, int] = {}
        self._location: list[tuple[Path, int]] = []
        blocks = []
        for path, table, rows in _unique_rows(self.root, ["prompt_id", "prompt", "sorted_rewards"]):
            _check_texts(
                self.root, path, table["prompt_id"].to_pylist(), table["prompt"].to_pylist(), prompts
            )
            blocks.append(_reward_matrix(path, table, self.m)[rows])
            for row in rows:
                self._index[table["prompt_id"][row].as_py()] = len(self._location)
                self._location.append((path, row))
        self._rewards = torch.from_numpy(np.concatenate(blocks)) if blocks else torch.empty(0, self.m)
        self._open_shard: tuple[Path, pa.Table] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._index

    def rewards_for(self, prompt_ids: Sequence[str]) -> torch.Tensor:
        """Sorted reference rewards, float32 [len(prompt_ids), M], one row per prompt (for log F_hat)."""
        self._require(prompt_ids)
        return self._rewards[[self._index[pid] for pid in prompt_ids]]

    def record(self, prompt_id: str) -> RefRecord:
        """The cached answers and rewards of one prompt, in draw order."""
        self._require([prompt_id])
        path, row = self._location[self._index[prompt_id]]
        # Keep the last shard open: iterating prompts in cache order then reads each shard once.
        if self._open_shard is None or self._open_shard[0] != path:
            self._open_shard = (path, _read_shard(path, SHARD_SCHEMA.names, self._settings))
        values = self._open_shard[1].slice(row, 1).to_pylist()[0]
        del values["sorted_rewards"]
        return RefRecord(**values)

    def records(self) -> Iterator[RefRecord]:
        """Every cached record, shard by shard."""
        return (self.record(pid) for pid in self._index)

    def _require(self, prompt_ids: Sequence[str]) -> None:
        missing = [pid for pid in prompt_ids if pid not in self._index]
        if missing:
            raise VbonError(
                f"{len(missing)} of {len(prompt_ids)} prompts are not in the reference cache {self.root} "
                f"(e.g. {missing[0]!r}); run `vbon refcache` with this config to complete it"
            )


def validate_cache(root: str | Path, expected_ids: Iterable[str] | None = None) -> CacheSummary:
    """Check every record (M finite rewards, sorted copy consistent, M answers) and that `expected_ids` are
    all present (given as an id -> text mapping, the cached prompt texts must match too); return the
    summary, or raise a VbonError naming shard and prompt."""
    root = Path(root)
    m = load_fingerprint(root)["num_ref_samples"]
    found: set[str] = set()
    shards = 0
    texts = expected_ids if isinstance(expected_ids, Mapping) else None
    for path, table, rows in _unique_rows(root, SHARD_SCHEMA.names):
        shards += 1
        columns = table.to_pydict()
        _check_texts(root, path, columns["prompt_id"], columns["prompt"], texts)
        for row in rows:
            pid = columns["prompt_id"][row]
            problem = _record_problem(
                columns["rewards"][row],
                columns["sorted_rewards"][row],
                columns["token_ids"][row],
                columns["texts"][row],
                m,
            )
            if problem:
                raise VbonError(
                    f"reference cache shard {path}: prompt {pid!r}: {problem}; delete the shard and rerun "
                    "`vbon refcache` to regenerate its prompts"
                )
            found.add(pid)
    missing = [pid for pid in expected_ids or () if pid not in found]
    if missing:
        raise VbonError(
            f"the reference cache {root} lacks {len(missing)} prompts (e.g. {missing[0]!r}); "
            "rerun `vbon refcache` to complete it"
        )
    return CacheSummary(num_prompts=len(found), num_ref_samples=m, num_shards=shards)


# ---------------------------------------------------------------- helpers


def _record_problem(
    rewards: Sequence[float | None],
    sorted_rewards: Sequence[float | None],
    token_ids: Sequence[Any],
    texts: Sequence[Any],
    m: int,
) -> str | None:
    """What is wrong with one record, or None."""
    if len(rewards) != m:
        return f"{len(rewards)} rewards, expected M = {m} (vbon.num_ref_samples)"
    if len(token_ids) != m or len(texts) != m:
        return f"{len(token_ids)} token id lists and {len(texts)} texts for {m} rewards"
    bad = [r for r in rewards if r is None or not math.isfinite(r)]
    if bad:
        return f"non-finite reward {bad[0]} (check the reward model)"
    if list(sorted_rewards) != sorted(rewards):  # type: ignore[type-var]
        return "sorted_rewards is not the ascending sort of rewards"
    return None


def _check_texts(
    root: Path, path: Path, ids: Sequence[str], texts: Sequence[str], expected: Mapping[str, str] | None
) -> None:
    """Refuse records whose prompt text differs from the expected text under the same id."""
    for pid, text in zip(ids, texts, strict=True):
        if expected is not None and pid in expected and expected[pid] != text:
            raise VbonError(
                f"reference cache shard {path}: prompt {pid!r} was cached for another text ({text[:40]!r}, "
                f"now {expected[pid][:40]!r}); {ANOTHER_CACHE}, or delete {root} to rebuild"
            )


def _shard_paths(root: Path) -> list[Path]:
    return sorted(root.glob(SHARD_GLOB))


def _read_shard(path: Path, columns: list[str], settings: str) -> pa.Table:
    """The shard's columns, refused unless it was made under the settings whose hash is `settings`."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise VbonError(
            f"reference cache shard {path} is unreadable ({err}); delete it and rerun `vbon refcache` "
            "to regenerate its prompts"
        ) from None
    if (table.schema.metadata or {}).get(SETTINGS_KEY) != settings.encode():
        raise VbonError(
            f"reference cache shard {path} was made under other settings than {FINGERPRINT_FILE} (or by an "
            f"older vbon_ds); delete {path.parent} to rebuild the cache"
        )
    return table


def _unique_rows(root: Path, columns: list[str]) -> Iterator[tuple[Path, pa.Table, list[int]]]:
    """Each shard with the rows whose prompt id no earlier shard had; a repeated id is warned about."""
    first_seen: dict[str, Path] = {}
    settings = settings_hash(load_fingerprint(root))
    for path in _shard_paths(root):
        table = _read_shard(path, columns, settings)
        rows = []
        for row, pid in enumerate(table["prompt_id"].to_pylist()):
            if pid in first_seen:
                warnings.warn(
                    f"reference cache: prompt {pid!r} is in {first_seen[pid].name} and {path.name}; "
                    "keeping the first",
                    stacklevel=3,
                )
                continue
            first_seen[pid] = path
            rows.append(row)
        yield path, table, rows


def _reward_matrix(path: Path, table: pa.Table, m: int) -> np.ndarray:
    """The shard's sorted rewards as float32 [rows, M]."""
    column = table["sorted_rewards"].combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy()
    if (lengths != m).any():
        pid = table["prompt_id"][int(np.argmax(lengths != m))].as_py()
        raise VbonError(
            f"reference cache shard {path}: prompt {pid!r} has {lengths[lengths != m][0]} rewards, expected "
            f"M = {m}; run `vbon refcache` to validate and repair the cache"
        )
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, m)
