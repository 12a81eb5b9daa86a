"""On-disk cache of reference samples: per prompt, M answers drawn from pi_ref and their rewards.

Layout of `<output_dir>/refcache/`:
  fingerprint.json                what the samples depend on (the models' paths and content, generation, M,
                                  format version), written once the first shard is complete
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

import hashlib
import importlib.metadata
import inspect
import json
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

from vbon_ds.config import ExperimentConfig, RewardConfig
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.rewards import get_reward_function
from vbon_ds.errors import VbonError, writing
from vbon_ds.models.content_digest import ModelNotDownloaded, checkpoint_content

# 3: fingerprint.json records the models' content (model_content); 2 recorded their paths only.
FORMAT_VERSION = 3
SETTINGS_KEY = b"vbon_fingerprint_sha256"
FINGERPRINT_FILE = "fingerprint.json"
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


def fingerprint_from_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings the cached samples and rewards depend on; changing any of them invalidates the cache."""
    model, gen, reward = cfg.model, cfg.generation, cfg.reward
    return {
        "reference": model.reference or model.actor,
        "gguf_file": model.gguf_file,
        "tokenizer": model.tokenizer or model.actor,
        "reward_model": reward.model,
        "reward_function": reward.function,
        "missing_eos_score": reward.missing_eos_score,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "top_k": gen.top_k,
        "num_ref_samples": cfg.vbon.num_ref_samples,
    }


def refcache_dir(cfg: ExperimentConfig) -> Path:
    """Where this experiment's reference cache lives: train.refcache_dir, else train.output_dir/refcache."""
    return Path(cfg.train.refcache_dir or Path(cfg.train.output_dir) / "refcache")


# ---------------------------------------------------------------- the models' content

# Extra packages whose version changes what a registered reward function returns.
REWARD_PACKAGES = {"vader": ("vaderSentiment",)}


def _reward_content(reward: RewardConfig) -> dict[str, Any]:
    """The reward's identity: a model's content, or a function's name, source and package versions."""
    if not reward.function:
        return checkpoint_content(reward.model) if reward.model else {}
    function = get_reward_function(reward.function)
    versions = {}
    for package in REWARD_PACKAGES.get(reward.function, ()):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "function": reward.function,
        "source_sha256": hashlib.sha256(inspect.getsource(function).encode()).hexdigest(),
        "packages": versions,
    }


def models_content(cfg: ExperimentConfig) -> dict[str, Any]:
    """Content fingerprints of the reference, the tokenizer and the reward (see `checkpoint_content`):
    a path records where a model is, this records what is there."""
    model = cfg.model
    separate_reference = bool(model.reference) and model.reference != model.actor
    return {
        "reference": checkpoint_content(
            model.reference if separate_reference else model.actor,
            "" if separate_reference else model.gguf_file,
        ),
        "tokenizer": checkpoint_content(
            model.tokenizer or model.actor, "" if model.tokenizer else model.gguf_file, weights=False
        ),
        "reward": _reward_content(cfg.reward),
    }


def models_downloaded(cfg: ExperimentConfig) -> bool:
    """Whether every model of the cache's fingerprint is local (a path, or a hub id already downloaded)."""
    try:
        models_content(cfg)
    except ModelNotDownloaded:
        return False
    return True


def cache_fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the cache of this config records and is checked against: its settings and its models' content."""
    return {**fingerprint_from_config(cfg), "model_content": models_content(cfg)}


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
        self._stored = _stored_fingerprint(fingerprint)
        self.m: int = self._stored["num_ref_samples"]
        if (self.root / FINGERPRINT_FILE).exists():
            _check_fingerprint(self.root, self._stored)
            self._stored = _load_fingerprint(self.root)  # equal, and hashed as written (1 == 1.0)
        elif _shard_paths(self.root):
            # fingerprint.json was deleted: adopt the shards only if they were made under these settings.
            for path in _shard_paths(self.root):
                _read_shard(path, ["prompt_id"], settings_hash(self._stored))
            self._write_fingerprint()
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
            self._write_fingerprint()  # only now: a run that failed before its first shard leaves no trace

    def _write_fingerprint(self) -> None:
        _write_json(self.root / FINGERPRINT_FILE, self._stored)  # racing ranks write identical content

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
    settings = settings_hash(_load_fingerprint(root))
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
        stored = _load_fingerprint(self.root)
        if fingerprint is not None:
            _check_fingerprint(self.root, _stored_fingerprint(fingerprint))
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
    m = _load_fingerprint(root)["num_ref_samples"]
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


def _stored_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as it is written to disk: JSON values (tuples become lists) plus the format version."""
    if not isinstance(fingerprint.get("num_ref_samples"), int):
        raise ValueError("the reference cache fingerprint needs an int 'num_ref_samples' (M)")
    return json.loads(json.dumps({"format_version": FORMAT_VERSION, **fingerprint}))


def settings_hash(stored: Mapping[str, Any]) -> str:
    """What every shard records about the settings it was made under (a fingerprint as stored)."""
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def _load_fingerprint(root: Path) -> dict[str, Any]:
    path = root / FINGERPRINT_FILE
    if not path.is_file():
        raise VbonError(
            f"no reference cache in {root} ({FINGERPRINT_FILE} is missing); run `vbon refcache` first"
        )
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        stored = err
    if not isinstance(stored, dict):
        raise VbonError(f"{path} is corrupt (not a JSON object); delete {root} to rebuild the cache")
    version = stored.get("format_version")
    if version != FORMAT_VERSION:
        # Version 2 recorded the models' paths, not their content: its samples cannot be tied to the models.
        why = " (it does not record the models' content)" if version == 2 else ""
        raise VbonError(
            f"the reference cache in {root} has format version {version}, this vbon_ds reads version "
            f"{FORMAT_VERSION}{why}; delete {root} to rebuild it"
        )
    return stored


# Where to put a cache made under new settings: train.refcache_dir names it, whether set or not.
ANOTHER_CACHE = "set train.refcache_dir to another directory"


def _check_fingerprint(root: Path, expected: dict[str, Any]) -> None:
    stored, expected = _flat(_load_fingerprint(root)), _flat(expected)
    absent = "<absent>"
    differing = [
        f"{key}: cached {stored.get(key, absent)!r}, now {expected.get(key, absent)!r}"
        for key in sorted(stored.keys() | expected.keys())
        if stored.get(key, absent) != expected.get(key, absent)
    ]
    if differing:
        raise VbonError(
            f"the reference cache in {root} was made with other settings ({'; '.join(differing)}); "
            f"{ANOTHER_CACHE}, or delete {root} to rebuild it"
        )


def _flat(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level, keys joined with '.', so that a mismatch names the file that differs."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            flat.update(_flat(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


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


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        partial.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)


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
    settings = settings_hash(_load_fingerprint(root))
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
