"""`vbon plan`: memory per GPU of each engine of a training run, before renting GPUs (no DeepSpeed import).

    plan = memory_plan(cfg, 8, needs, rollout=True, pair_graphs=False, gpu_memory_gb=80)
    print(format_plan(plan))  # ConfigError above: batch sizes that do not divide W

The caller says which engines and phases the run has: `vbon plan` asks the algorithm registry
(vbon_ds.algorithms.registry.training_memory_plan), so the plan sizes what `vbon train` builds for algo.name:
e.g. the offline baselines have an actor and a reference, no rollout and no scoring phase (their answers
and rewards come from the reference cache).

Model shapes come from the checkpoints' configs (AutoConfig: no weights are loaded; a hub id needs the
network) and, when the hub is unreachable, from a built-in table of the Pythia configs the TL;DR recipes use.
Parameter counts are exact: each model is built on the meta device with the run's trainable subset
(vbon_ds.models.adapters), so LoRA adapters, frozen layers and tied heads count as they will in the engines.

Per engine and GPU, in the run's dtype (bfloat16 under model.dtype=auto on a GPU):
- parameters: ZeRO-3 keeps ceil(n / W) elements of each tensor per rank, plus a whole copy of the tensors
  under stage3_param_persistence_threshold; lower stages keep every parameter on every rank. Offloaded
  parameters (offload_param, deepspeed.reference_offload) use no GPU memory.
- gradients (trainable parameters), in the run's dtype: ZeRO-2/3 keep this rank's partition, ZeRO-0/1 all.
- fp32 gradients: the optimizer step's fp32 copy of those gradients (4 bytes an element of the partition),
  wherever there is an fp32 master copy.
- optimizer states: fp32 master copy + Adam's two moments (12 bytes an element; 8 at ZeRO-0 in fp32, where
  the weights are the master copy), partitioned from ZeRO-1 on; none on the GPU with offload_optimizer.
  With 16-bit weights that is DeepSpeed's 18 bytes per trainable parameter and rank (2 16-bit gradients +
  4 fp32 gradients + 4 fp32 master + 8 Adam) next to the 16-bit weights, as its estimators count them
  (estimate_zero2_model_states_mem_needs; tests/test_plan.py checks the figures against them, and against
  the tensors a 2-rank ZeRO-2 and ZeRO-3 engine holds).
- activations of one micro-batch (train.micro_batch_size sequences of max_prompt_tokens + max_new_tokens):
  34 s b h bytes per layer at 16 bits (Korthikanti et al. 2022, with SDPA attention keeping no s x s scores)
  for each layer backward reaches (the top model.trainable_layers only when the layers below are frozen);
  with gradient checkpointing, each such layer's input (2 s b h bytes) plus one layer recomputed. The pair
  losses (pair_graphs) hold two graphs, chosen and rejected, until their backward. Frozen engines: one
  layer's forward at their batch (micro-batch; reward.batch_size for the reward model).
- generation (on-policy algorithms) with the hf sampler: the KV cache of generation.batch_size sequences,
  and under ZeRO-3 with generation.gather_params the whole actor gathered for the call. With the vllm
  sampler (generation.engine=vllm, or auto: the plan is for a GPU cluster, where auto picks vLLM), the vLLM
  engine takes generation.vllm_gpu_memory_utilization of the card while sampling instead; with
  generation.vllm_sleep its KV cache is freed and its weights offloaded during the update, otherwise it
  stays resident through training too.
- gathered working set: ZeRO-3 gathers the largest layer plus a prefetch bucket during forward/backward, and
  the fused log-prob kernel the whole lm head.
- backward gradients: ZeRO-2/3 reduce-scatter gradients as backward produces them, so the full-size
  gradients of the largest trained layer and of the lm head exist at once before their partitions are kept
  (with the gathered layer, DeepSpeed's "4 x the largest layer" of ZeRO-3).

The total is what stays resident (parameters, gradients, fp32 gradients, optimizer states of every engine)
plus the largest transient need of one phase (rollout, scoring, training): an estimate, not a measurement;
allocator fragmentation and communication buckets come on top (hence a 10% margin against the card).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPTNeoXConfig,
    PretrainedConfig,
)

from vbon_ds.batching import BatchSizes, batch_sizes
from vbon_ds.config import ExperimentConfig, ModelConfig
from vbon_ds.engines.build import EngineNeeds
from vbon_ds.engines.ds_config import fill_ds_config, load_ds_template, precision
from vbon_ds.errors import VbonError
from vbon_ds.models.adapters import apply_trainable_subset, decoder_blocks
from vbon_ds.models.loading import load_model_config

GIB = 1024**3
MARGIN = 0.9  # the share of the card a plan may fill
DEFAULT_CARD_GB = 80.0
"""The card `vbon plan` checks against unless told (the TL;DR recipes' 8 x 80 GB nodes)."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# (layers, hidden, heads, vocab, intermediate) of EleutherAI's Pythia configs (GPT-NeoX, untied head).
PYTHIA = {
    "pythia-1b": (16, 2048, 8, 50304, 8192),
    "pythia-2.8b": (32, 2560, 32, 50304, 10240),
    "pythia-6.9b": (32, 4096, 32, 50432, 16384),
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of one model: every parameter tensor's size and which of them train."""

    source: str
    """Where the shape came from: the checkpoint's config, or the built-in Pythia table."""
    layers: int
    hidden: int
    kv_dim: int
    """Keys (or values) per token and layer: kv heads x head dim."""
    numels: tuple[int, ...]
    trainable: tuple[bool, ...]
    largest_layer: int
    """Elements of the largest transformer block."""
    largest_trained_layer: int
    """Trainable elements of the transformer block with the most of them (gradients in backward)."""
    head: int
    """Elements of the output layer (lm head or score head)."""
    head_trained: bool
    """Whether the output layer's weight trains."""
    trained_layers: int
    """Layers that backward runs through (all, or the top trainable_layers when the rest is frozen)."""

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def trainable_total(self) -> int:
        return sum(n for n, t in zip(self.numels, self.trainable, strict=True) if t)


@dataclass
class EngineMemory:
    """Bytes per GPU of one engine; `elements` holds the element counts behind the resident part."""

    name: str
    shape: ModelShape
    stage: int
    params: float = 0.0
    grads: float = 0.0
    grads32: float = 0.0
    """The fp32 copy of the gradient partition the optimizer step works on."""
    optimizer: float = 0.0
    activations: float = 0.0
    """Training or forward working memory at the configured gradient checkpointing."""
    activations_other: float = 0.0
    """The same with gradient checkpointing the other way round (trainable engines)."""
    generation: float = 0.0
    """KV cache plus, under ZeRO-3 with gather_params, the gathered weights (actor only)."""
    gathered: float = 0.0
    """ZeRO-3 gathered working set during forward/backward."""
    backward_grads: float = 0.0
    """ZeRO-2/3: full-size gradients of the largest trained layer and the head before reduce-scatter."""
    elements: dict[str, int] = field(default_factory=dict)

    @property
    def resident(self) -> float:
        return self.params + self.grads + self.grads32 + self.optimizer

    @property
    def model_states(self) -> float:
        """Resident state plus the largest layer's full-size working set, as DeepSpeed's estimators count."""
        return self.resident + self.gathered + self.backward_grads

    @property
    def training(self) -> float:
        """Transient memory of this engine's forward and backward on one micro-batch."""
        return self.activations + self.gathered + self.backward_grads


@dataclass
class MemoryPlan:
    world_size: int
    sizes: BatchSizes
    dtype: str
    engines: list[EngineMemory]
    notes: list[str]
    on_policy: bool
    """Whether a step samples rollouts (on-policy) rather than reading cached answers (offline baselines)."""
    gpu_memory_gb: float
    """The card the plan is checked against (it also sizes vLLM's share)."""
    sampler: str
    """The rollout sampler the plan assumes: hf or vllm (generation.engine, auto resolved for a GPU)."""
    vllm: float = 0.0
    """Bytes the vLLM engine takes while sampling (0 without rollouts or with the hf sampler)."""
    vllm_resident: bool = False
    """Whether vLLM keeps them through the update too (generation.vllm_sleep off)."""

    @property
    def resident(self) -> float:
        return sum(e.resident for e in self.engines) + (self.vllm if self.vllm_resident else 0.0)

    @property
    def phases(self) -> dict[str, float]:
        """Transient memory of each phase of a training step (one phase runs at a time)."""
        by_name = {e.name: e for e in self.engines}
        sampling = by_name["actor"].generation + (0.0 if self.vllm_resident else self.vllm)
        out = {"rollout": sampling} if self.on_policy else {}
        if "reward" in by_name:
            out["scoring"] = by_name["reward"].activations + by_name["reward"].gathered
        out["training"] = max(e.training for e in self.engines if e.name in ("actor", "critic", "reference"))
        return out

    @property
    def total(self) -> float:
        return self.resident + max(self.phases.values())

    def fits(self) -> bool:
        return self.total <= MARGIN * self.gpu_memory_gb * GIB


# ------------------------------------------------------------------ model shapes


def pythia_config(path: str) -> PretrainedConfig | None:
    """The GPT-NeoX config of the Pythia size named in `path` (e.g. a cleanrl TL;DR id), from the table."""
    match = re.search(r"pythia-(1b|2\.8b|6\.9b)", path)
    if match is None:
        return None
    layers, hidden, heads, vocab, inter = PYTHIA[f"pythia-{match.group(1)}"]
    return GPTNeoXConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
        intermediate_size=inter, rotary_pct=0.25, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def model_config(path: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(config, where it came from): the checkpoint's config, else the Pythia table for Pythia names."""
    try:
        return load_model_config(path, trust_remote_code=trust_remote_code), "config"
    except VbonError as err:
        fallback = pythia_config(path)
        if fallback is None:
            raise VbonError(f"vbon plan: {err} (the built-in table knows only {', '.join(PYTHIA)})") from None
        return fallback, "built-in Pythia table (hub unreachable)"


@functools.lru_cache(maxsize=32)
def _shape(
    path: str, kind: str, trainable_layers: int, lora: tuple[int, float, tuple[str, ...]], trust: bool
) -> ModelShape:
    config, source = model_config(path, trust)
    classifier = kind.endswith("classifier")
    if classifier:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust)
    rank, alpha, targets = lora
    subset = ModelConfig(
        trainable_layers=trainable_layers, lora_rank=rank, lora_alpha=alpha, lora_target_modules=list(targets)
    )
    if not kind.startswith("frozen"):
        apply_trainable_subset(model, subset, seed=0, lora=bool(rank))
    else:
        model.requires_grad_(False)
    params = list(model.parameters())  # tied weights appear once, as in the engines
    blocks = decoder_blocks(model)
    trained_per_block = [sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks]
    head = model.score if classifier else model.get_output_embeddings()
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = config.hidden_size
    layers = len(blocks)
    return ModelShape(
        source=source,
        layers=layers,
        hidden=hidden,
        kv_dim=kv_heads * (getattr(config, "head_dim", None) or hidden // heads),
        numels=tuple(p.numel() for p in params),
        trainable=tuple(p.requires_grad for p in params),
        largest_layer=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        largest_trained_layer=max(trained_per_block),
        head=head.weight.numel(),
        head_trained=head.weight.requires_grad,
        trained_layers=trainable_layers or layers,
    )


def model_shape(cfg: ExperimentConfig, path: str, kind: str, *, lora: bool = False) -> ModelShape:
    """The shape of `path` as the actor ('causal'), the critic ('classifier'), the reference ('frozen') or
    the reward model ('frozen-classifier'), with the run's trainable subset (LoRA: the actor only)."""
    m = cfg.model
    trainable_layers = 0 if kind.startswith("frozen") else m.trainable_layers
    lora_key = (m.lora_rank, m.lora_alpha, tuple(m.lora_target_modules)) if lora else (0, 0.0, ())
    return _shape(path, kind, trainable_layers, lora_key, m.trust_remote_code)


# ------------------------------------------------------------------ arithmetic


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _layer_activation(seq: int, batch: int, hidden: int, nbytes: int) -> float:
    """Bytes one transformer layer keeps for backward: 34 s b h at 16 bits, SDPA attention."""
    return 34 * seq * batch * hidden * nbytes / 2


def _trainable_engine(
    name: str, shape: ModelShape, ds: dict, world: int, nbytes: int, cfg: ExperimentConfig, graphs: int = 1
) -> EngineMemory:
    """`graphs`: forward graphs alive together in backward (2 for the pair losses' chosen and rejected)."""
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    mem = EngineMemory(name, shape, stage)
    _resident_params(mem, shape, zero, world, nbytes)
    trainable = [n for n, t in zip(shape.numels, shape.trainable, strict=True) if t]
    total = sum(trainable)
    if stage == 3:
        partition = sum(_ceil_div(n, world) for n in trainable)
    elif stage in (1, 2):  # one flat group per rank, padded to a multiple of 2 x world size
        partition = _ceil_div(total, 2 * world) * 2
    else:
        partition = total
    grads = partition if stage >= 2 else total
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    master = 0 if (stage == 0 and nbytes == 4) else partition
    mem.elements.update(grads=grads, master=master, adam=2 * partition)
    mem.grads = 0.0 if offload_opt and stage >= 2 else grads * nbytes
    mem.grads32 = 0.0 if offload_opt else 4 * master
    mem.optimizer = 0.0 if offload_opt else (4 * master + 8 * partition)

    seq = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens
    micro = cfg.train.micro_batch_size
    layer = _layer_activation(seq, micro, shape.hidden, nbytes)
    full = graphs * shape.trained_layers * layer
    checkpointed = graphs * shape.trained_layers * seq * micro * shape.hidden * nbytes + layer
    on = cfg.model.gradient_checkpointing
    mem.activations, mem.activations_other = (checkpointed, full) if on else (full, checkpointed)
    mem.gathered = _gathered(shape, zero, mem.stage, nbytes)
    if stage >= 2:
        mem.backward_grads = (shape.largest_trained_layer + shape.head * shape.head_trained) * nbytes
    return mem


def _gathered(shape: ModelShape, zero: dict, stage: int, nbytes: int) -> float:
    """ZeRO-3's gathered weights in forward/backward: the largest layer, a prefetch bucket, the lm head."""
    if stage != 3:
        return 0.0
    return (zero.get("stage3_prefetch_bucket_size", 0) + shape.largest_layer + shape.head) * nbytes


def _resident_params(mem: EngineMemory, shape: ModelShape, zero: dict, world: int, nbytes: int) -> None:
    offloaded = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    if mem.stage == 3:
        threshold = zero.get("stage3_param_persistence_threshold", 0)
        partitioned = sum(_ceil_div(n, world) for n in shape.numels)
        persistent = sum(n for n in shape.numels if n < threshold)
        mem.elements.update(params=partitioned, persistent=persistent)
        mem.params = 0.0 if offloaded else (partitioned + persistent) * nbytes
    else:
        mem.elements.update(params=shape.total, persistent=0)
        mem.params = shape.total * nbytes


def _frozen_engine(
    name: str, shape: ModelShape, ds: dict, world: int, nbytes: int, seq: int, batch: int
) -> EngineMemory:
    zero = ds.get("zero_optimization", {})
    mem = EngineMemory(name, shape, int(zero.get("stage", 0)))
    _resident_params(mem, shape, zero, world, nbytes)
    mem.activations = _layer_activation(seq, batch, shape.hidden, nbytes)
    mem.gathered = _gathered(shape, zero, mem.stage, nbytes)
    return mem


def _engine_ds(cfg: ExperimentConfig, sizes: BatchSizes, shape: ModelShape, trainable: bool) -> dict:
    """The DeepSpeed config the builders would fill on a bf16-capable GPU (frozen engines: ZeRO-3)."""
    template = load_ds_template(cfg.deepspeed.config)
    if not trainable and template.get("zero_optimization", {}).get("stage") != 3:
        template = load_ds_template("zero3")
    return fill_ds_config(
        template, cfg, sizes, on_gpu=True, bf16_supported=True, hidden_size=shape.hidden, trainable=trainable
    )


def planned_sampler(cfg: ExperimentConfig) -> tuple[str, str]:
    """(sampler, why) of a GPU run: generation.engine, with auto taken as vllm, its choice on a GPU where vLLM
    is installed (a plan is for the GPU cluster, not for the machine that prints it)."""
    engine = cfg.generation.engine
    if engine == "auto":
        return "vllm", "generation.engine=auto, assumed vllm: auto's choice on a GPU with vLLM installed"
    return engine, f"generation.engine={engine}"


def memory_plan(
    cfg: ExperimentConfig,
    world_size: int,
    needs: EngineNeeds,
    *,
    rollout: bool,
    pair_graphs: bool,
    gpu_memory_gb: float = DEFAULT_CARD_GB,
) -> MemoryPlan:
    """Per-GPU memory of the engines `needs` names (a trainable actor) at `world_size` ranks on cards of
    `gpu_memory_gb`, with a rollout phase when `rollout` and two forward graphs in the actor's backward when
    `pair_graphs` (ConfigError: batch sizes)."""
    sizes = batch_sizes(cfg, world_size)
    dtype = precision(cfg, on_gpu=True, bf16_supported=True)
    nbytes = DTYPE_BYTES[dtype]
    seq = cfg.data.max_prompt_tokens + cfg.generation.max_new_tokens

    def trainable(name: str, shape: ModelShape, graphs: int = 1) -> EngineMemory:
        ds = _engine_ds(cfg, sizes, shape, trainable=True)
        return _trainable_engine(name, shape, ds, world_size, nbytes, cfg, graphs)

    def frozen(name: str, shape: ModelShape, batch: int) -> EngineMemory:
        ds = _engine_ds(cfg, sizes, shape, trainable=False)
        return _frozen_engine(name, shape, ds, world_size, nbytes, seq, batch)

    lora = bool(cfg.model.lora_rank)
    actor = trainable(
        "actor",
        model_shape(cfg, cfg.model.actor, "causal", lora=lora),
        graphs=2 if pair_graphs else 1,
    )
    sampler, why = planned_sampler(cfg)
    engines, notes = [actor], []
    vllm = 0.0
    if rollout and sampler == "hf":
        actor.generation = _generation(actor, cfg, seq, nbytes)
    elif rollout:
        vllm = cfg.generation.vllm_gpu_memory_utilization * gpu_memory_gb * GIB
        during_update = "freed (vllm_sleep)" if cfg.generation.vllm_sleep else "resident too (vllm_sleep off)"
        notes.append(
            f"sampler: vllm ({why}): generation.vllm_gpu_memory_utilization "
            f"{cfg.generation.vllm_gpu_memory_utilization:g} x {gpu_memory_gb:g} GB while sampling; "
            f"during the update {during_update}"
        )
    else:
        notes.append(f"sampler: hf ({why})")
    if needs.critic:
        engines.append(trainable("critic", model_shape(cfg, _critic_path(cfg), "classifier")))
    if needs.reference and lora and cfg.model.reference in ("", cfg.model.actor):
        notes.append("reference: the actor with its LoRA adapters off (no engine of its own)")
    elif needs.reference:
        ref_shape = model_shape(cfg, cfg.model.reference or cfg.model.actor, "frozen")
        engines.append(frozen("reference", ref_shape, cfg.train.micro_batch_size))
    if not needs.scorer:
        notes.append(
            f"{cfg.algo.name}: answers and rewards come from the reference cache (no rollout, no scoring)"
        )
    elif cfg.reward.function:
        notes.append(f"reward: the rule function {cfg.reward.function!r} (no GPU memory)")
    else:
        rm_shape = model_shape(cfg, cfg.reward.model, "frozen-classifier")
        engines.append(frozen("reward", rm_shape, cfg.reward.batch_size))
    for source in sorted({e.shape.source for e in engines} - {"config"}):
        notes.append(f"model shapes from the {source}")
    return MemoryPlan(
        world_size, sizes, dtype, engines, notes, rollout, gpu_memory_gb, sampler, vllm,
        vllm_resident=bool(vllm) and not cfg.generation.vllm_sleep,
    )  # fmt: skip


def _generation(actor: EngineMemory, cfg: ExperimentConfig, seq: int, nbytes: int) -> float:
    """The KV cache of one generation batch, plus the whole actor when ZeRO-3 gathers it for sampling."""
    shape = actor.shape
    kv_cache = 2 * shape.layers * cfg.generation.batch_size * seq * shape.kv_dim * nbytes
    gathered = shape.total * nbytes if actor.stage == 3 and cfg.generation.gather_params else 0
    return kv_cache + gathered


def _critic_path(cfg: ExperimentConfig) -> str:
    """The critic's trunk: the reward model (model.critic_init=reward, when there is one) or the actor."""
    from_reward = cfg.model.critic_init == "reward" and bool(cfg.reward.model) and not cfg.reward.function
    return cfg.reward.model if from_reward else cfg.model.actor


# ------------------------------------------------------------------ report


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a markdown table (GiB per GPU; a vllm row when vLLM samples) and the verdict against the
    plan's card."""
    s = plan.sizes
    lines = [
        f"Memory per GPU at world size {plan.world_size} ({plan.dtype}; per rank: {s.prompts_per_rank} "
        f"prompts, micro-batch {s.micro_batch_per_rank}, {s.gradient_accumulation_steps} accumulation "
        "steps), GiB:",
        "",
        "| engine | ZeRO | parameters | trainable | params | grads | fp32 grads | optimizer | activations "
        "| activations, ckpt toggled | generation | gathered | backward grads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in plan.engines:
        lines.append(
            f"| {e.name} | {e.stage} | {e.shape.total / 1e6:.1f}M | {e.shape.trainable_total / 1e6:.1f}M "
            f"| {_gib(e.params)} | {_gib(e.grads)} | {_gib(e.grads32)} | {_gib(e.optimizer)} "
            f"| {_gib(e.activations)} | {_gib(e.activations_other)} | {_gib(e.generation)} "
            f"| {_gib(e.gathered)} | {_gib(e.backward_grads)} |"
        )
    if plan.vllm:  # the engine's own share of the card: weights and KV cache, in the generation column
        when = "resident" if plan.vllm_resident else "sampling only"
        lines.append(f"| vllm ({when}) | - | - | - | - | - | - | - | - | - | {_gib(plan.vllm)} | - | - |")
    phases = plan.phases
    peak = max(phases, key=phases.get)
    gpu_memory_gb = plan.gpu_memory_gb
    verdict = "fits" if plan.fits() else "does NOT fit"
    lines += [
        "",
        f"resident {_gib(plan.resident)} + largest phase ({peak}) {_gib(phases[peak])} "
        f"= {_gib(plan.total)} GiB per GPU: {verdict} a {gpu_memory_gb:g} GB card "
        f"(limit {MARGIN:.0%} = {_gib(MARGIN * gpu_memory_gb * GIB)} GiB)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
