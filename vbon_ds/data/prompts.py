"""Prompt data sets: a split of a local file, a directory or a hub dataset; stable ids; a resumable order.

Sources (`data.source`):
- a JSONL / JSON / parquet / CSV file;
- a directory written by `datasets.save_to_disk` (a DatasetDict or a single Dataset);
- a directory of such files: a file's split is its name up to the first "-", "_" or "." (`train.jsonl`,
  `validation-00000-of-00002.parquet`), so every file whose name starts the same belongs to one split;
- otherwise a hub dataset id, loaded with `datasets.load_dataset`.

A source with a single split (a bare file, or a dataset that only has `train`) is split by convention: if
its rows have a `split` column, each role takes the rows whose `split` equals `data.train_split` or
`data.eval_split`; otherwise the last tenth of the rows (at least one) is the evaluation set and the rest
is the training set, so the two never overlap.

`data.format` reads Reddit TL;DR data (vbon_ds/data/tldr.py): with `tldr`, or `auto` and rows that have
`subreddit`/`title`/`post` columns or whose prompt column (else `query`) holds a TL;DR query in any row,
each prompt is the OpenAI-style query "SUBREDDIT: r/...\n\nTITLE: ...\n\nPOST: ...\n\nTL;DR:" built from the
row, and a row that is not one is an error naming it. `auto` prints the layout it chose and why, once.

Each prompt gets a stable id: the `id` column when the rows have one, else a hash of the prompt text; a
repeated id gets "#1", "#2", ... by order of appearance. The reference cache is keyed by these ids.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from vbon_ds.config import DataConfig
from vbon_ds.data import tldr
from vbon_ds.errors import VbonError

ID_COLUMN = "id"
SPLIT_COLUMN = "split"
EVAL_FRACTION = 0.1
"""Share of rows held out for evaluation from a source that has neither splits nor a `split` column."""
DEMO_PROMPTS = Path(__file__).parent.parent / "resources" / "prompts" / "movie_reviews.jsonl"
"""Movie-review openings shipped for `vbon demo` (40 train, 8 validation)."""


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one split in source order; `ids[i]` is the stable id of `texts[i]`."""

    split: str
    ids: list[str]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def load_prompts(data: DataConfig, role: Literal["train", "eval"]) -> PromptSet:
    """Load the training or evaluation prompts that `data` describes, checked and truncated to its limits."""
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', got {role!r}")
    split = _split_name(data, role)
    limit = data.max_train_prompts if role == "train" else data.max_eval_prompts
    tables, unsplit = _split_tables(data, role)
    layouts = {id(t): _layout(t, data) for t in tables}
    for table in tables:
        # An empty file has no columns either; it gets the "no prompts" message below.
        if table.num_rows and layouts[id(table)] is None:
            _require_column(table.columns, data.prompt_column, table.name)
    rows = _rows_by_convention(tables, data, role) if unsplit else _all_rows(tables)
    if not rows:
        total = len(_all_rows(tables))
        held_out = (
            f" ({total} rows in all; without splits the last tenth is for evaluation)" if unsplit else ""
        )
        raise VbonError(f"data.source {data.source}: split {split!r} has no prompts{held_out}")
    if limit:
        rows = rows[:limit]
    texts, raw_ids = [], []
    for table, i in rows:
        where = f"{table.name}, split {split!r}, row {i}"
        layout = layouts[id(table)]
        if layout is not None:
            row = {name: values[i] for name, values in table.columns.items()}
            texts.append(tldr.query_from_row(row, layout, where))
        else:
            texts.append(_checked_prompt(table.columns[data.prompt_column][i], where))
        raw_ids.append(_raw_id(table, i, texts[-1], where))
    return PromptSet(split=split, ids=_disambiguate(raw_ids), texts=texts)


class PromptSampler:
    """An endless, reproducible order over prompt indices: a new shuffle each epoch, resumable mid-epoch.

    The order depends only on (seed, epoch), so every rank can build the same sampler, draw the same global
    batch and take its own slice, whatever the world size.
    """

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        # `random` hashes a str seed with SHA-512: the same order on every platform, run and Python 3.x.
        random.Random(f"vbon-prompts/{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[int]:
        """The next `size` prompt indices; a batch that reaches the end of an epoch continues in the next."""
        batch: list[int] = []
        while len(batch) < size:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            take = min(size - len(batch), self.num_prompts - self.position)
            batch += self._order[self.position : self.position + take]
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue the same order (store it in the checkpoint)."""
        return {
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()` output, saved with the same prompt count and seed."""
        if (state["num_prompts"], state["seed"]) != (self.num_prompts, self.seed):
            raise VbonError(
                f"the checkpoint's prompt order is for {state['num_prompts']} prompts with seed "
                f"{state['seed']}, but this run has {self.num_prompts} prompts with seed {self.seed}; resume "
                "with the same data.* settings and train.seed, or start fresh with train.resume=none"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


# ---------------------------------------------------------------- reading sources


@dataclass(frozen=True)
class _Table:
    """Rows of one file or one dataset split, column-wise; `name` says where they came from in messages."""

    name: str
    columns: dict[str, list[Any]]

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


def _split_tables(data: DataConfig, role: str) -> tuple[list[_Table], bool]:
    """The tables of `role`'s split, or all tables and True when the source has only one split to offer."""
    if not data.source:
        raise VbonError(
            "data.source is empty: set it to a prompt file, a dataset directory or a hub dataset id"
        )
    path = Path(data.source).expanduser()
    if path.is_file():
        return [_read_file(path)], True
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            import datasets  # slow to import; only these sources need it

            return _pick_split(
                _dataset_splits(datasets.load_from_disk(str(path)), str(path), data), role, data
            )
        return _pick_split(_directory_splits(path), role, data)
    if _looks_local(data.source):
        raise VbonError(f"data.source: file not found: {path}")
    return _pick_split(_hub_splits(data), role, data)


def _pick_split(
    splits: dict[str, Callable[[], list[_Table]]], role: str, data: DataConfig
) -> tuple[list[_Table], bool]:
    """Choose one split of a source; splits are read lazily so only the chosen one is materialised."""
    split = _split_name(data, role)
    if len(splits) == 1:
        return next(iter(splits.values()))(), True
    if split not in splits:
        raise VbonError(
            f"data.source {data.source} has no split {split!r} (splits: {', '.join(sorted(splits))}); "
            f"set data.{role}_split to one of them"
        )
    return splits[split](), False


def _dataset_splits(obj: Any, name: str, data: DataConfig) -> dict[str, Callable[[], list[_Table]]]:
    import datasets

    parts = obj.items() if isinstance(obj, datasets.DatasetDict) else [("all", obj)]
    return {
        split: (lambda ds=ds, split=split: [_dataset_table(ds, f"{name} [{split}]", data)])
        for split, ds in parts
    }


def _dataset_table(ds: Any, name: str, data: DataConfig) -> _Table:
    # Check before selecting, so the message can list every column the data set has.
    if data.format == "plain" or not any(c in ds.column_names for c in tldr.COLUMNS):
        _require_column(ds.column_names, data.prompt_column, name)
    wanted = (data.prompt_column, ID_COLUMN, SPLIT_COLUMN, *tldr.COLUMNS)
    keep = [c for c in dict.fromkeys(wanted) if c in ds.column_names]
    return _Table(name, ds.select_columns(keep).to_dict())


def _hub_splits(data: DataConfig) -> dict[str, Callable[[], list[_Table]]]:
    import datasets

    from vbon_ds.models.loading import hub_cache_only, not_cached_error

    with hub_cache_only() as offline_reason:  # no network: the cached copy, or one line at once
        try:
            obj = datasets.load_dataset(data.source)
        except Exception as err:  # unknown id, no network, gated data: all mean the same thing to the user
            if offline_reason:
                raise not_cached_error("data.source", data.source, offline_reason, "dataset") from None
            raise VbonError(
                f"data.source {data.source!r} is not a local file or directory, and loading it as a hub "
                f"dataset failed: {err}"
            ) from None
    return _dataset_splits(obj, data.source, data)


def _looks_local(source: str) -> bool:
    """Whether a missing `source` was meant as a path rather than a hub id like `owner/name`."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).suffix in _READERS


def _directory_splits(root: Path) -> dict[str, Callable[[], list[_Table]]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _READERS)
    if not files:
        raise VbonError(
            f"data.source {root}: neither a saved dataset nor a directory with data files "
            f"({', '.join(sorted(_READERS))})"
        )
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(re.split(r"[-_.]", file.name, maxsplit=1)[0], []).append(file)
    return {split: (lambda paths=paths: [_read_file(p) for p in paths]) for split, paths in by_split.items()}


def _read_file(path: Path) -> _Table:
    reader = _READERS.get(path.suffix)
    if reader is None:
        raise VbonError(f"data.source {path}: unsupported file type (use {', '.join(sorted(_READERS))})")
    try:
        return _Table(str(path), reader(path))
    except UnicodeDecodeError as err:
        raise VbonError(
            f"data.source {path}: not UTF-8 text (it holds the byte {err.object[err.start]:#04x})"
        ) from None
    except (pa.ArrowException, OSError) as err:  # a truncated or foreign file under a .parquet name
        raise VbonError(f"data.source {path}: not a readable {path.suffix[1:]} file ({err})") from None


def _columns_from_rows(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(key for row in rows for key in row))
    return {name: [row.get(name) for row in rows] for name in names}


def _read_jsonl(path: Path) -> dict[str, list[Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise VbonError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise VbonError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
    return _columns_from_rows(rows)


def _read_json(path: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines under a .json name, which `datasets` accepts too
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return data  # an object of columns
    rows = [data] if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise VbonError(f"{path}: expected a list of objects, an object of columns, or JSON lines")
    return _columns_from_rows(rows)


def _read_csv(path: Path) -> dict[str, list[Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        return _columns_from_rows(list(csv.DictReader(f)))


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    return pq.read_table(path).to_pydict()


_READERS: dict[str, Callable[[Path], dict[str, list[Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


# ---------------------------------------------------------------- rows, checks and ids


def _layout(table: _Table, data: DataConfig) -> tldr.Layout | None:
    """How `table`'s rows hold TL;DR posts; None for plain prompts. auto says what it chose and why."""
    if not table.num_rows or data.format == "plain":
        return None
    if data.format == "tldr":
        try:
            return tldr.tldr_layout(list(table.columns), data.prompt_column)
        except VbonError as err:
            raise VbonError(f"{table.name}: {err}") from None
    layout = tldr.auto_layout(table.columns, data.prompt_column)
    if layout is not None:
        _say_once(f"data: {table.name}: {layout.describe()} ({layout.reason})")
    elif data.prompt_column in table.columns:  # else the missing column is the error
        _say_once(
            f"data: {table.name}: plain prompts from column {data.prompt_column!r} (data.format=auto: no row "
            f"of it is a TL;DR query, and there are no {'/'.join(tldr.FIELDS)} columns)"
        )
    return layout


@functools.cache
def _say_once(line: str) -> None:
    """Print `line` once a process, on the first rank only (each command loads its prompts several times)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def _split_name(data: DataConfig, role: str) -> str:
    return data.train_split if role == "train" else data.eval_split


def _require_column(columns: Any, column: str, name: str) -> None:
    if column not in columns:
        listed = ", ".join(map(str, columns)) or "none"
        raise VbonError(f"{name}: no column {column!r} (columns: {listed}); set data.prompt_column")


def _all_rows(tables: list[_Table]) -> list[tuple[_Table, int]]:
    return [(t, i) for t in tables for i in range(t.num_rows)]


def _rows_by_convention(tables: list[_Table], data: DataConfig, role: str) -> list[tuple[_Table, int]]:
    """Rows of `role` in a source without splits: by its `split` column, else the last tenth for eval."""
    rows = _all_rows(tables)
    if all(SPLIT_COLUMN in t.columns for t in tables):
        split = _split_name(data, role)
        chosen = [(t, i) for t, i in rows if t.columns[SPLIT_COLUMN][i] == split]
        if rows and not chosen:
            values = sorted({str(t.columns[SPLIT_COLUMN][i]) for t, i in rows})
            raise VbonError(
                f"data.source {data.source}: no row has {SPLIT_COLUMN} == {split!r} "
                f"(values: {', '.join(values)}); set data.{role}_split"
            )
        return chosen
    num_eval = max(1, int(len(rows) * EVAL_FRACTION))
    return rows[-num_eval:] if role == "eval" else rows[:-num_eval]


def _checked_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise VbonError(f"{where}: the prompt is {type(value).__name__} {value!r}, expected text")
    if not value.strip():
        raise VbonError(f"{where}: the prompt is empty or only whitespace")
    return value  # kept verbatim: trailing spaces and newlines are part of some prompt formats (TL;DR)


def _raw_id(table: _Table, i: int, text: str, where: str) -> str:
    if ID_COLUMN not in table.columns:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    value = table.columns[ID_COLUMN][i]
    if value is None or not str(value).strip():
        raise VbonError(f"{where}: the {ID_COLUMN!r} column is empty")
    return str(value)


def _disambiguate(ids: list[str]) -> list[str]:
    """Make ids unique by suffixing repeats with #1, #2, ... in order of appearance."""
    used: set[str] = set()
    repeats: dict[str, int] = {}
    unique = []
    for pid in ids:
        candidate = pid
        while candidate in used:  # loops more than once only if a data set's own ids look like "x#1"
            repeats[pid] = repeats.get(pid, 0) + 1
            candidate = f"{pid}#{repeats[pid]}"
        used.add(candidate)
        unique.append(candidate)
    return unique
