"""The sweep file of `vbon sweep`: its schema and checks (running it: sweep.py).

    output_dir: runs/sweep            # where everything goes (relative to the working directory)
    base:                             # the experiment every run starts from; at most one of preset / config
      preset: smollm2                 #   a `vbon demo` preset (tiny, smollm2), or
      config: ../launch/tldr_vbon.yaml  #   an experiment YAML (relative to the sweep file)
      set: [train.steps=20]           #   --set overrides for every run
    launcher: ""                      # optional command prefix of every stage
    parallel: 1                       # training runs at once (one GPU, small model); not with a launcher
    evaluate:
      set: [generation.eval_samples=8]  # --set overrides of the evaluation only
    runs:                             # name (letters, digits, . _ -) + --set overrides, one per point
      - {name: vbon_n4, set: [vbon.n=4]}
      - {name: vbon_n8_seed1, method: vBoN, set: [vbon.n=8, train.seed=1]}   # method: default the name

The sweep places every run and the cache: train.output_dir and train.refcache_dir are refused in any `set`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vbon_ds.config import ConfigError
from vbon_ds.config_parsing import load_yaml

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_KEYS = ("output_dir", "base", "launcher", "parallel", "evaluate", "runs")
# Paths every stage gets from the sweep: an override of them would be replaced, so it is refused.
SWEEP_PATHS = {
    "train.output_dir": "each run trains in <output_dir>/runs/<name>",
    "train.refcache_dir": "every run shares the cache in <output_dir>/refcache",
}


@dataclass
class SweepRun:
    """One point of the frontier: its name (directory runs/<name>), its --set overrides and the method it
    counts for in the front counts (runs of several seeds or settings share one)."""

    name: str
    overrides: list[str]
    method: str = ""


@dataclass
class Sweep:
    """A validated sweep file."""

    output_dir: Path
    runs: list[SweepRun]
    preset: str = ""
    base_config: Path | None = None
    base_overrides: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)
    parallel: int = 1
    """How many training runs go at once (the cache before them and the evaluation after run alone)."""
    eval_overrides: list[str] = field(default_factory=list)


def _mapping(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    unknown = [k for k in value if k not in keys]
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known keys: {', '.join(keys)})")
    return value


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}: expected a list of KEY=VALUE strings, got {value!r}")
    for override in value:
        key = override.split("=", 1)[0].strip()
        if key in SWEEP_PATHS:
            raise ConfigError(
                f"{where}: {key} is the sweep's to set ({SWEEP_PATHS[key]}); remove it, or change the "
                "sweep file's output_dir"
            )
    return value


def _string(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _launcher(text: str) -> list[str]:
    """The launcher's words, its program resolved on PATH or beside this Python (a venv not activated)."""
    words = shlex.split(text)
    if not words:
        return []
    beside = Path(sys.executable).parent / words[0]
    found = shutil.which(words[0]) or (str(beside) if shutil.which(beside) else None)
    if found is None:
        raise ConfigError(f"launcher: {words[0]!r} is not a command on PATH nor beside {sys.executable}")
    return [found, *words[1:]]


def _parallel(value: Any, launcher: list[str]) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"parallel: {value!r} is not allowed (allowed: an integer >= 1)")
    if value > 1 and launcher:
        raise ConfigError(
            f"parallel: {value} runs at once is refused with a launcher: launcher stages are multi-process, "
            "each needing its own ports and GPUs; remove launcher or set parallel: 1"
        )
    return value


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML; every message names the field (runs[i] for a run)."""
    from vbon_ds.commands.demo import PRESETS

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid YAML file: {' '.join(str(err).split())}") from None
    data = _mapping(data, f"{path}: ", TOP_KEYS)
    output_dir = _string(data.get("output_dir"), "output_dir").strip()
    if not output_dir:
        raise ConfigError("output_dir: required (the sweep's directory)")
    base = _mapping(data.get("base") or {}, "base.", ("preset", "config", "set"))
    preset = _string(base.get("preset"), "base.preset")
    config = _string(base.get("config"), "base.config")
    if preset and preset not in PRESETS:
        raise ConfigError(f"base.preset: {preset!r} is not allowed (allowed: {', '.join(PRESETS)})")
    if preset and config:
        raise ConfigError("base: give base.preset or base.config, not both")
    base_config = (path.parent / config) if config else None
    if base_config is not None and not base_config.is_file():
        raise ConfigError(f"base.config: {base_config} not found")
    evaluate = _mapping(data.get("evaluate") or {}, "evaluate.", ("set",))
    runs_value = data.get("runs")
    if not isinstance(runs_value, list) or not runs_value:
        raise ConfigError("runs: expected a non-empty list of {name, set} entries")
    runs, seen = [], set()
    for i, entry in enumerate(runs_value):
        entry = _mapping(entry, f"runs[{i}].", ("name", "method", "set"))
        name = _string(entry.get("name"), f"runs[{i}].name")
        if not RUN_NAME.match(name):
            raise ConfigError(f"runs[{i}].name: {name!r} is not a directory name (letters, digits, . _ -)")
        if name in seen:
            raise ConfigError(f"runs[{i}].name: {name!r} is used twice")
        seen.add(name)
        method = _string(entry.get("method"), f"runs[{i}].method").strip() or name
        runs.append(SweepRun(name, _overrides(entry.get("set"), f"runs[{i}] ({name}).set"), method))
    launcher = _launcher(_string(data.get("launcher"), "launcher"))
    return Sweep(
        output_dir=Path(output_dir).expanduser().resolve(),
        runs=runs,
        preset=preset,
        base_config=base_config,
        base_overrides=_overrides(base.get("set"), "base.set"),
        launcher=launcher,
        parallel=_parallel(data.get("parallel"), launcher),
        eval_overrides=_overrides(evaluate.get("set"), "evaluate.set"),
    )
