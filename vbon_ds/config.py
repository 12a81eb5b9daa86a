"""Experiment configuration: the typed dataclasses, `load_config` and the checks that span fields.

Every field has a default and a one-line docstring (the string literal under it), which `vbon config
--reference` turns into the README's config reference. Allowed values and ranges live beside the field in
its metadata, so one walker (vbon_ds/config_parsing.py, which also reads the YAML and the `--set`
overrides) validates everything and every message names the field.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vbon_ds.config_parsing import (
    ConfigError,
    apply_mapping,
    bounded,
    choice,
    nest,
    parse_override,
    read_sections,
    reference_tables,
    without_fields,
)

EMPTY_OUTPUT_DIR = "train.output_dir: empty; set the directory for checkpoints, caches, logs and results"

ON_POLICY_ALGOS = ("ppo", "rloo")
"""Algorithms that train on the actor's own rollouts."""
OFFLINE_ALGOS = ("bon_sft", "dpo", "ipo", "bonbon")
"""Algorithms that train on the reference cache's answers."""


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
    """KL coefficient of kl_rl (required there); must stay null for vbon objectives, whose beta is 1/(N-1)."""


@dataclass
class AlgoConfig:
    name: str = choice("ppo", *ON_POLICY_ALGOS, *OFFLINE_ALGOS)
    """ppo (GAE + critic) or rloo (leave-one-out) on rollouts; bon_sft, dpo, ipo, bonbon on cached answers."""
    samples_per_prompt: int = bounded(1, 1)
    """On-policy K: answers rolled out per prompt each step (RLOO needs K >= 2)."""
    subsets_per_prompt: int = bounded(1, 1)
    """Offline: random N-subsets (N = vbon.n) of each prompt's cached answers drawn per step."""
    ppo_epochs: int = bounded(4, 1)
    """On-policy: passes over each step's rollouts."""
    offline_epochs: int = bounded(4, 1)
    """Offline: passes over each step's subsets of cached answers."""
    num_minibatches: int = bounded(1, 1)
    """Optimizer steps per epoch; each step's batch is split into this many minibatches."""
    clip_range: float = bounded(0.2, 0.0, open_low=True)
    """PPO ratio clip epsilon."""
    value_clip_range: float = bounded(0.2, 0.0, open_low=True)
    """PPO value-function clip epsilon."""
    gamma: float = bounded(1.0, 0.0, 1.0)
    """GAE discount."""
    lam: float = bounded(0.95, 0.0, 1.0)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean, unit variance over the batch."""
    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward penalty: k1 = log pi - log pi_ref only (k2, k3 bias gradients)."""
    old_logprobs: str = choice("auto", "auto", "sampling", "forward")
    """Old log-probs: recorded while sampling, or a forward; auto: recorded if actor and sampler are fp32."""
    sampler_is_cap: float = bounded(2.0, 1.0)
    """Cap C of the per-token weights min(pi_trainer / pi_sampler, C) when the sampler is not the trainer."""
    dpo_beta: float = bounded(0.1, 0.0, open_low=True)
    """DPO's KL strength beta in -log sigmoid(beta * margin) (0.1 as in the DPO paper)."""
    ipo_beta: float | None = bounded(None, 0.0, open_low=True)
    """IPO and BoNBoN beta (margin target 1/(2 beta)); null: BoNBoN's 1/(2 (N-1) H_(N-1)) for N answers."""
    bonbon_alpha: float = bounded(0.98, 0.0, 1.0)
    """BoNBoN's SFT weight against (1 - alpha) * IPO; 0.98: equal gradient norms at start, N=8 (math.md)."""

    # Two fields per quantity, not one read two ways: the samples per prompt and the epochs of a step.
    @property
    def offline(self) -> bool:
        """Whether the algorithm trains on the reference cache rather than on rollouts."""
        return self.name in OFFLINE_ALGOS

    @property
    def items_per_prompt(self) -> int:
        """What a step's batch holds per prompt: K rollouts on-policy, N-subsets of the cache offline."""
        return self.subsets_per_prompt if self.offline else self.samples_per_prompt

    @property
    def epochs(self) -> int:
        """Passes over each step's batch."""
        return self.offline_epochs if self.offline else self.ppo_epochs


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
    engine: str = choice("auto", "auto", "hf", "vllm")
    """Sampler: hf (transformers generate) or vllm (in-process, per rank); auto: vllm on GPU if installed."""
    vllm_dtype: str = choice("auto", "auto", "float32", "bfloat16", "float16")
    """vLLM's weights and logits; auto: the trainer's dtype (its log-probs can then be the old ones)."""
    vllm_gpu_memory_utilization: float = bounded(0.3, 0.0, 1.0, open_low=True)
    """GPU: fraction of the card vLLM takes for weights and KV cache (`vbon plan` counts it)."""
    vllm_kv_cache_gb: float = bounded(0.0, 0.0)
    """CPU: vLLM's KV cache in GiB; 0: sized from batch_size and the prompt and answer lengths."""
    vllm_tensor_parallel_size: int = bounded(1, 1)
    """Ranks (GPUs of one node) that share one vLLM engine, for a model that does not fit one GPU."""
    vllm_sleep: bool = True
    """GPU: free vLLM's KV cache and offload its weights during the update (sleep mode)."""
    vllm_enforce_eager: bool = False
    """Run vLLM without CUDA graphs / torch.compile (faster start, slower sampling); always on CPU."""


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


# ---------------------------------------------------------------- loading, with deprecated names

REMOVED_FIELDS = {
    ("algo", "value_coef"): (
        "it had no effect: the critic has its own Adam, which undoes a constant loss scale "
        "(it only moved where train.max_grad_norm clipped the critic's gradients); remove it"
    ),
}
"""Fields removed in this release: accepted, with a warning saying why they are ignored, until the next."""

OFFLINE_RENAMES = (("samples_per_prompt", "subsets_per_prompt"), ("ppo_epochs", "offline_epochs"))
"""(old, new) algo fields: offline runs used to read the on-policy field; for one release they still do."""


def _move_offline_fields(algo: AlgoConfig, warnings: list[str]) -> None:
    """An offline run that set an old on-policy field (and left its offline field alone) keeps its value.

    Values, not keys, decide: a dumped config names every field, and a sweep's base.yaml (a dump of an
    on-policy config) must keep meaning what it did for the offline runs built on it."""
    if not algo.offline:
        return
    defaults = AlgoConfig()
    for old, new in OFFLINE_RENAMES:
        old_value = getattr(algo, old)
        if old_value != getattr(defaults, old) and getattr(algo, new) == getattr(defaults, new):
            setattr(algo, new, old_value)
            setattr(algo, old, getattr(defaults, old))
            warnings.append(
                f"algo.{old} is deprecated for offline algorithms (algo.name={algo.name}); "
                f"use algo.{new} (set to {old_value} here)"
            )


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Build the experiment config: defaults, then the YAML file, then `--set` overrides; then validate.

    Deprecated names are applied with a one-line warning on stderr, each printed once per load."""
    sources = [] if path is None else [read_sections(Path(path))]
    # The raw string goes to the converter as is, so "1e-5" and "abc" keep their meaning per field type.
    sources += [nest(*parse_override(text)) for text in overrides]
    cfg, warnings = ExperimentConfig(), []
    for values in sources:
        values, removed = without_fields(values, REMOVED_FIELDS)
        warnings += [f"{'.'.join(key)} is deprecated and ignored: {REMOVED_FIELDS[key]}" for key in removed]
        apply_mapping(cfg, values)
    _move_offline_fields(cfg.algo, warnings)
    for warning in dict.fromkeys(warnings):
        print(f"vbon: warning: {warning}", file=sys.stderr)
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


def _check_objective_beta(vbon: VbonConfig) -> None:
    """vbon.beta belongs to kl_rl alone: a vBoN objective's coefficient is 1/(N-1), and a beta that silently
    replaced it would train toward no Best-of-N distribution (an error, not an override: change vbon.n)."""
    if vbon.objective == "kl_rl" and vbon.beta is None:
        raise ConfigError("vbon.beta: the kl_rl objective needs an explicit KL coefficient (e.g. 0.05)")
    if vbon.objective != "kl_rl" and vbon.beta is not None:
        raise ConfigError(
            f"vbon.beta: {vbon.beta} is set with vbon.objective={vbon.objective}, whose KL coefficient is "
            f"1/(N-1) = {1 / (vbon.n - 1):.4g} from vbon.n={vbon.n}; leave vbon.beta null (change vbon.n to "
            "change beta), or use vbon.objective=kl_rl"
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
    _check_objective_beta(cfg.vbon)
    if cfg.algo.name == "rloo" and cfg.algo.samples_per_prompt < 2:
        raise ConfigError(
            "algo.samples_per_prompt: RLOO needs at least 2 samples per prompt, "
            f"got {cfg.algo.samples_per_prompt}"
        )
    if cfg.algo.offline and cfg.vbon.n > cfg.vbon.num_ref_samples:
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
    return reference_tables(ExperimentConfig)
