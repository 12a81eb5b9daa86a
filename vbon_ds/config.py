"""Experiment configuration: typed dataclasses, YAML loading, `--set a.b=c` overrides, load-time validation.

Every field has a default and a one-line docstring (the string literal under it), which `vbon config
--reference` turns into the README's config reference. Allowed values and ranges live beside the field in
its metadata, so one walker validates everything and every message names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vbon_ds.errors import VbonError


class ConfigError(VbonError):
    """A config value is unknown, of the wrong type or out of range; the message names the field."""


EMPTY_OUTPUT_DIR = "train.output_dir: empty; set the directory for checkpoints, caches, logs and results"


def choice(default: Any, *allowed: Any) -> Any:
    """A field whose value must be one of `allowed`."""
    return field(default=default, metadata={"choices": allowed})


def bounded(
    default: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> Any:
    """A numeric field in [low, high] (or (low, high] with open_low)."""
    return field(default=default, metadata={"low": low, "high": high, "open_low": open_low})


@dataclass
class ModelConfig:
    actor: str = ""
    """Policy to train: a Hugging Face hub id or a local directory."""
    reference: str = ""
    """Reference policy pi_ref (frozen); empty means the same checkpoint as `actor`."""
    tokenizer: str = ""
    """Tokenizer to use for actor and reference; empty means the actor's."""
    gguf_file: str = ""
    """GGUF file name inside `actor` to load from (e.g. the SmolLM2 demo); empty for ordinary checkpoints."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with a checkpoint; off unless you trust its source."""
    dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16")
    """Parameter dtype; auto is bfloat16 on a GPU that supports it and float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory on the actor and critic."""
    trainable_layers: int = bounded(0, 0)
    """Train only the top K layers (+ final norm, untied head) of actor and critic; 0: all layers."""
    lora_rank: int = bounded(0, 0)
    """LoRA rank of the actor's adapters (peft; base weights frozen, reference = adapters off); 0: off."""
    lora_alpha: float = bounded(16.0, 0.0, open_low=True)
    """LoRA scale numerator: each adapted weight becomes W + (lora_alpha / lora_rank) * B @ A."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Modules that get LoRA adapters (e.g. query_key_value,dense); empty: peft's default for the model."""
    critic_init: str = choice("reward", "reward", "actor")
    """Trunk the PPO critic starts from: the reward model's or the actor's."""
    logprob_backend: str = choice("auto", "auto", "torch", "triton")
    """Token log-prob kernel: auto picks Triton on CUDA when importable, else the chunked torch path."""


@dataclass
class DataConfig:
    source: str = ""
    """Prompts: a JSONL/JSON/parquet/CSV file, a saved dataset directory, or a hub dataset id."""
    train_split: str = "train"
    """Split used for training prompts."""
    eval_split: str = "validation"
    """Split used for evaluation prompts."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    format: str = choice("auto", "auto", "plain", "tldr")
    """tldr: Reddit posts as SUBREDDIT/TITLE/POST/TL;DR: queries; auto: tldr when the rows are TL;DR posts."""
    max_prompt_tokens: int = bounded(512, 1)
    """Longer prompts lose their start (a TL;DR query: the end of its post, cut at a newline)."""
    max_train_prompts: int = bounded(0, 0)
    """Use at most this many training prompts (0 = all)."""
    max_eval_prompts: int = bounded(0, 0)
    """Use at most this many evaluation prompts (0 = all)."""


@dataclass
class RewardConfig:
    model: str = ""
    """Reward model (sequence classifier with one output): hub id or local directory."""
    function: str = ""
    """Name of a registered rule-based reward function used instead of `model` (e.g. vader)."""
    batch_size: int = bounded(16, 1)
    """Prompt+response pairs scored per reward-model forward."""
    missing_eos_score: float | None = None
    """Raw score of answers cut off before EOS (null: the model's); vbon objectives give them min log F."""
    eval_model: str = ""
    """Separate evaluation reward model for `vbon evaluate` only (reported beside the training reward)."""
    eval_function: str = ""
    """Registered rule reward for `vbon evaluate` only, instead of `eval_model`; empty: none."""


@dataclass
class VbonConfig:
    objective: str = choice("vbon", "vbon", "vbon_exact", "kl_rl")
    """vbon: reward log F(r), beta=1/(N-1); vbon_exact: tie-aware log(pi_BoN/pi_ref)/(N-1); kl_rl: raw r."""
    n: int = bounded(8, 2)
    """N of the Best-of-N distribution to imitate (sets beta = 1/(N-1) for the vBoN objectives)."""
    num_ref_samples: int = bounded(32, 1)
    """M: reference samples per prompt cached to estimate the reward CDF F."""
    beta: float | None = bounded(None, 0.0)
    """KL coefficient for kl_rl (required there); for vbon objectives null means 1/(N-1)."""


@dataclass
class AlgoConfig:
    name: str = choice("ppo", "ppo", "rloo", "bon_sft", "dpo", "ipo", "bonbon")
    """ppo (GAE + critic) or rloo (leave-one-out) on rollouts; bon_sft, dpo, ipo, bonbon on cached answers."""
    samples_per_prompt: int = bounded(1, 1)
    """K: answers rolled out per prompt each step (RLOO needs K >= 2); offline: N-subsets drawn per prompt."""
    ppo_epochs: int = bounded(4, 1)
    """Passes over each rollout batch."""
    num_minibatches: int = bounded(1, 1)
    """Optimizer steps per PPO epoch; the rollout batch is split into this many minibatches."""
    clip_range: float = bounded(0.2, 0.0, open_low=True)
    """PPO ratio clip epsilon."""
    value_clip_range: float = bounded(0.2, 0.0, open_low=True)
    """PPO value-function clip epsilon."""
    value_coef: float = bounded(0.1, 0.0)
    """Weight of the value loss in the critic objective."""
    gamma: float = bounded(1.0, 0.0, 1.0)
    """GAE discount."""
    lam: float = bounded(0.95, 0.0, 1.0)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the batch."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward penalty: k1 = log pi - log pi_ref only (k2, k3 bias gradients)."""
    old_logprobs: str = choice("auto", "auto", "sampling", "forward")
    """Actor log-probs of a rollout: recorded while sampling, or a forward; auto: sampling for fp32 actors."""
    dpo_beta: float = bounded(0.1, 0.0, open_low=True)
    """DPO's KL strength beta in -log sigmoid(beta * margin) (0.1 as in the DPO paper)."""
    ipo_beta: float | None = bounded(None, 0.0, open_low=True)
    """IPO and BoNBoN beta (margin target 1/(2 beta)); null: BoNBoN's 1/(2 (N-1) H_(N-1)) for N answers."""
    bonbon_alpha: float = bounded(0.98, 0.0, 1.0)
    """BoNBoN's SFT weight against (1 - alpha) * IPO; 0.98: equal gradient norms at start, N=8 (math.md)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = bounded(50, 1)
    """Maximum response length in tokens."""
    min_new_tokens: int = bounded(0, 0)
    """Minimum response length before EOS is allowed; must be 0 (log-probs are of the unmasked softmax)."""
    temperature: float = bounded(0.7, 0.0, open_low=True)
    """Rollout sampling temperature (the log-probs use the same temperature)."""
    top_p: float = bounded(1.0, 0.0, 1.0, open_low=True)
    """Nucleus sampling mass; must be 1.0 (off): log-probs, KL and BoN bounds assume the full softmax."""
    top_k: int = bounded(0, 0)
    """Sample from the k most likely tokens; must be 0 (off): log-probs assume the full softmax."""
    batch_size: int = bounded(16, 1)
    """Answers sampled per generate() call (rollouts, the reference cache and evaluation)."""
    gather_params: bool = True
    """Under ZeRO-3, gather the whole actor once per generate call (fast); off: per-layer synced gathering."""
    eval_samples: int = bounded(4, 1)
    """Answers sampled per evaluation prompt at each evaluation temperature."""
    eval_temperatures: list[float] = field(default_factory=lambda: [0.7])
    """Sampling temperatures at which `vbon evaluate` reports reward and KL."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/vbon"
    """Directory for tensorboard/, checkpoints/, refcache/ and eval/."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    steps: int = bounded(100, 1)
    """Number of rollout + update steps."""
    prompts_per_step: int = bounded(16, 1)
    """Prompts drawn per step across all ranks."""
    micro_batch_size: int = bounded(4, 1)
    """Sequences per rank per forward/backward."""
    lr: float = bounded(3e-6, 0.0, open_low=True)
    """Actor learning rate (AdamW)."""
    critic_lr: float = bounded(1e-5, 0.0, open_low=True)
    """Critic learning rate (AdamW, PPO only)."""
    weight_decay: float = bounded(0.0, 0.0)
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    lr_schedule: str = choice("constant", "constant", "cosine")
    """Learning-rate schedule after warmup."""
    warmup_steps: int = bounded(0, 0)
    """Linear warmup, in optimizer steps."""
    max_grad_norm: float = bounded(1.0, 0.0)
    """Gradient clipping norm (0 disables clipping)."""
    checkpoint_every: int = bounded(50, 0)
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = bounded(2, 1)
    """Keep this many most recent checkpoints."""
    resume: str = "auto"
    """auto: continue from output_dir/checkpoints/latest if any; none: start fresh; or a checkpoint path."""
    refcache_dir: str = ""
    """Reference cache directory; empty means output_dir/refcache. Runs with the same models share one."""
    refcache_shard_prompts: int = bounded(64, 1)
    """Prompts per reference-cache shard: an interrupted `vbon refcache` redoes at most this many."""
    max_bad_steps: int = bounded(3, 1)
    """Stop after this many consecutive updates skipped for non-finite loss or reward."""


@dataclass
class DeepSpeedConfig:
    config: str = "zero3"
    """DeepSpeed JSON: zero2, zero3 or zero3_offload (in the top-level ds_configs/) or your own file."""
    reference_offload: bool = False
    """Keep the frozen reference and reward parameters on CPU (ZeRO-3 offload)."""
    force_stage: bool = False
    """Run the JSON's ZeRO stage even in a world of one (else one process runs stage 0 unless it offloads)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""
    log_every: int = bounded(1, 1)
    """Write scalars every this many steps."""
    sample_every: int = bounded(10, 0)
    """Log sample answers as TensorBoard text every this many steps (0 disables)."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Actor, reference and tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data set."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward model or function."""
    vbon: VbonConfig = field(default_factory=VbonConfig)
    """Objective: vBoN (N, M) or the KL-RL baseline."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Policy-gradient algorithm."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, batch sizes, checkpoints."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Monitoring."""


# ---------------------------------------------------------------- docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstrings written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = following.value.value.strip()
    return docs


# ---------------------------------------------------------------- type conversion


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field type `tp`, or raise a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        is_null = value is None or (isinstance(value, str) and value.lower() in {"null", "none", "~"})
        if is_null and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                return _convert(value, arg, where)
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (str, int)) and str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str):
                return int(value.strip())
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif tp is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                number = float(value.strip())
            if number is not None and not math.isfinite(number):
                raise ConfigError(f"{where}: {number!r} is not a finite number")
            if number is not None:
                return number
        elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except ValueError:
        pass
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _check_metadata(value: Any, meta: typing.Mapping[str, Any], where: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{where}: {value!r} is not allowed (allowed: {allowed})")
    if value is None or not isinstance(value, (int, float)):
        return
    low, high, open_low = meta.get("low"), meta.get("high"), meta.get("open_low", False)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if open_low else '['}{lo}, {hi}]"
        raise ConfigError(f"{where}: {value!r} is out of range (allowed: {interval})")


# ---------------------------------------------------------------- building from mappings


def _unknown_key(key: str, cls: type, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (known keys: {', '.join(names)})"
    return ConfigError(f"{where}{key}: unknown key{hint}")


def _apply(obj: Any, values: typing.Mapping[str, Any], prefix: str) -> None:
    """Set fields of dataclass instance `obj` from a nested mapping, converting and checking each value."""
    hints = typing.get_type_hints(type(obj))
    by_name = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in by_name:
            raise _unknown_key(str(key), type(obj), prefix)
        where = f"{prefix}{key}"
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: expected a mapping of {type(current).__name__} fields, got {value!r}"
                )
            _apply(current, value, f"{where}.")
            continue
        converted = _convert(value, hints[key], where)
        _check_metadata(converted, by_name[key].metadata, where)
        setattr(obj, key, converted)


def parse_override(text: str) -> tuple[list[str], str]:
    """Split one `a.b=c` override into its key path and raw value."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=1e-5")
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(path):
        nested = {part: nested}
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}: line {line}: key {key!r} is given twice "
                    f"(first on line {seen[key]}); merge the two"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, name: str) -> Any:
    loader = _UniqueKeyLoader(text)
    loader.name = name  # messages name the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Build the experiment config: defaults, then the YAML file, then `--set` overrides; then validate."""
    cfg = ExperimentConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = _load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
            ) from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(cfg, data, "")
    for text in overrides:
        key_path, raw = parse_override(text)
        # The raw string goes to the converter as is, so "1e-5" and "abc" keep their meaning per field type.
        _apply(cfg, _nest(key_path, raw), "")
    validate(cfg)
    return cfg


UNTRUNCATED_SAMPLING = (
    ("top_p", 1.0, "keeps only the nucleus"),
    ("top_k", 0, "keeps only the top k tokens"),
    ("min_new_tokens", 0, "masks EOS early"),
)
"""Sampling settings every pipeline needs at these values: (field, required value, what others do)."""


def _check_untruncated_sampling(gen: GenerationConfig) -> None:
    """Refuse a truncated sampling distribution: the recorder, the training forwards, the evaluation KL and
    the reference cache's BoN KL bound all use log-probs of the full softmax(logits / temperature)."""
    for name, required, effect in UNTRUNCATED_SAMPLING:
        value = getattr(gen, name)
        if value != required:
            raise ConfigError(
                f"generation.{name}: {value!r} {effect}, but every log-prob, KL and BoN bound is of the full "
                f"softmax(logits / temperature), so they would describe a distribution that was not sampled; "
                f"use {required!r} (and generation.temperature to sharpen sampling)"
            )


def validate(cfg: ExperimentConfig) -> None:
    """Checks that involve more than one field."""
    if not cfg.train.output_dir.strip():
        raise ConfigError(EMPTY_OUTPUT_DIR)
    if cfg.algo.kl_estimator != "k1":
        raise ConfigError(
            f"algo.kl_estimator: {cfg.algo.kl_estimator!r} is not allowed: as a per-token reward only k1's "
            "policy gradient is the gradient of KL(pi || pi_ref) (docs/math.md section 4); use k1"
        )
    _check_untruncated_sampling(cfg.generation)
    if cfg.vbon.objective == "kl_rl" and cfg.vbon.beta is None:
        raise ConfigError("vbon.beta: the kl_rl objective needs an explicit KL coefficient (e.g. 0.05)")
    if cfg.algo.name == "rloo" and cfg.algo.samples_per_prompt < 2:
        raise ConfigError(
            "algo.samples_per_prompt: RLOO needs at least 2 samples per prompt, "
            f"got {cfg.algo.samples_per_prompt}"
        )
    if cfg.algo.name in ("bon_sft", "dpo", "ipo", "bonbon") and cfg.vbon.n > cfg.vbon.num_ref_samples:
        raise ConfigError(
            f"vbon.n: algo.name={cfg.algo.name} takes the best of N={cfg.vbon.n} cached answers, but the "
            f"cache holds vbon.num_ref_samples={cfg.vbon.num_ref_samples} per prompt"
        )
    if cfg.reward.eval_model and cfg.reward.eval_function:
        raise ConfigError(
            f"reward.eval_function: {cfg.reward.eval_function!r} and reward.eval_model="
            f"{cfg.reward.eval_model!r} are both set; give at most one evaluation reward"
        )
    if len(cfg.train.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.adam_betas):
        raise ConfigError(f"train.adam_betas: expected two numbers in [0, 1), got {cfg.train.adam_betas}")
    if not cfg.generation.eval_temperatures or min(cfg.generation.eval_temperatures) <= 0:
        raise ConfigError(
            "generation.eval_temperatures: expected positive temperatures, "
            f"got {cfg.generation.eval_temperatures}"
        )
    if cfg.train.resume not in ("auto", "none") and not Path(cfg.train.resume).exists():
        raise ConfigError(
            f"train.resume: {cfg.train.resume!r} is neither auto, none nor an existing checkpoint"
        )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML dumps and checkpoint metadata)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_reference() -> str:
    """Markdown tables of every section and field with its type, default and docstring (for the README)."""
    lines: list[str] = []
    section_docs = field_docs(ExperimentConfig)
    for section in dataclasses.fields(ExperimentConfig):
        cls = type(getattr(ExperimentConfig(), section.name))
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        lines += [
            f"### `{section.name}`: {section_docs[section.name]}",
            "",
            "| key | type | default | meaning |",
        ]
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            allowed = f.metadata.get("choices")
            meaning = docs[f.name] + (f" One of: {', '.join(allowed)}." if allowed else "")
            lines.append(
                f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | `{default!r}` | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines)
