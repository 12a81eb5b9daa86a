"""`VllmSampler`: rollouts from an in-process vLLM engine that follows a policy engine's weights.

    sampler = VllmSampler(actor, cfg.generation, max_prompt_tokens=cfg.data.max_prompt_tokens)
    rollout = sampler.generate(prompt_ids, prompt_mask, temperature=0.7, max_new_tokens=50)

Colocated: each rank owns one engine in its own process, on its own device (no extra GPUs, no Ray); with
generation.vllm_tensor_parallel_size = t, groups of t ranks of one node share one engine (vLLM's external
launcher mode over the job's process group), each rank still returning the answers to its own prompts.

The engine starts from the model's config with dummy weights, and every weight comes from the policy
engine (`engines/weight_stream.py`): GGUF, LoRA and top-K models alike, never a second load from disk.
Before each sampling call the weights are pushed again if the engine took an optimizer step (or new
weights were loaded) since the last push; with model.trainable_layers or LoRA only the blocks that train.

Sampling is softmax(logits / T) of the full vocabulary, stopped at the same EOS ids as the HF path (the
model's own EOS and generation defaults are ignored), with per-request seeds drawn from torch's RNG, so
resume and evaluation seeding reproduce the same answers. vLLM's recorded log-probs are of that same
distribution (processed log-probs), in the engine's precision (`Rollout.sampler_dtype`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vbon_ds.config import GenerationConfig
from vbon_ds.engines import distributed
from vbon_ds.engines.lora import AdapterReference
from vbon_ds.engines.policy import PolicyEngine, Rollout, finish_rollout
from vbon_ds.engines.weight_stream import checkpoint_weights
from vbon_ds.errors import VbonError
from vbon_ds.models.sampler_choice import VLLM_INSTALL

# The engine runs in the calling process (no spawned engine core): colocated with the trainer's weights.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

_MIN_KV_CACHE_BYTES = 64 << 20


def import_vllm() -> Any:
    """The vllm module, or a one-line error naming the install command (missing or broken install)."""
    try:
        import vllm
    except Exception as err:  # an ImportError, or a broken build failing inside vllm's own imports
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise VbonError(
            f"generation.engine=vllm: vLLM cannot be imported ({first_line}); {VLLM_INSTALL}"
        ) from None
    _keep_transformers_classes_undecorated()
    # A push of the trainable blocks only is meant; vLLM warns about every layer it left as it was.
    for name in ("inplace", "layerwise"):
        logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").setLevel(logging.ERROR)
    return vllm


def _keep_transformers_classes_undecorated() -> None:
    """vLLM runs a model it has no code of its own for (GPT-NeoX, i.e. Pythia, in 0.32) through its
    Transformers backend, which decorates the transformers model class itself for torch.compile: every
    instance of it in this process, the trainer's too, would then bypass torch's module call (and ZeRO-3's
    hooks) or fail. Left undecorated, such a model runs uncompiled in vLLM (no CUDA graphs for it)."""
    from vllm.model_executor.models.transformers import base

    base.Base._decorate_for_torch_compile = lambda self: None


def kv_cache_bytes(config: Any, sequences: int, max_len: int, dtype: torch.dtype) -> int:
    """KV-cache bytes for `sequences` sequences of `max_len` tokens of a model `config` (keys and values
    of every layer), at most 256 sequences (vLLM runs more in turns), at least 64 MiB."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    return max(_MIN_KV_CACHE_BYTES, per_token * min(sequences, 256) * max_len)


@dataclass
class _PooledEngine:
    settings: str
    llm: Any
    owner: weakref.ref


_POOL: list[_PooledEngine] = []
"""Every vLLM engine this process started. They live as long as the process and are never shut down: a
vLLM engine's shutdown destroys the default process group (the job's) and the parallel state every vLLM
engine here shares. A sampler that is dropped (e.g. the reference cache's, before training starts) leaves
its engine to the next sampler started with the same settings, which pushes its own weights into it."""


def _pooled_engine(sampler: VllmSampler, settings: dict[str, Any], start: Callable[[], Any]) -> Any:
    """A free pooled engine started with `settings` (one whose sampler is gone), else a new one."""
    key = json.dumps(settings, sort_keys=True, default=str)
    sizes = {json.loads(entry.settings)["tensor_parallel_size"] for entry in _POOL}
    if sizes - {settings["tensor_parallel_size"]}:
        raise VbonError(
            f"generation.vllm_tensor_parallel_size: {settings['tensor_parallel_size']}, but this process "
            f"already runs vLLM engines of size {sizes.pop()} (vLLM's parallel state is one per process)"
        )
    for entry in _POOL:
        if entry.settings == key and entry.owner() is None:
            entry.owner = weakref.ref(sampler)
            return entry.llm
    _POOL.append(_PooledEngine(key, start(), weakref.ref(sampler)))
    return _POOL[-1].llm


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """vLLM seeds Python's, numpy's and torch's global generators when it starts: keep the job's streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


@contextlib.contextmanager
def _transformers_zero3_off() -> Iterator[None]:
    """vLLM builds some architectures (GPT-NeoX, i.e. Pythia) with transformers' from_config, which under the
    engines' live ZeRO-3 config would partition them in deepspeed.zero.Init and fail on vLLM's meta tensors:
    transformers sees no DeepSpeed config while the vLLM engine starts."""
    from transformers.integrations import deepspeed as hf_deepspeed

    live = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter; restored through the public setter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if live is not None and live() is not None:
            hf_deepspeed.set_hf_deepspeed_config(live())


def _refresh_output_heads(model: torch.nn.Module) -> None:
    """Redo the output heads' weight processing after a push. A head tied to the input embeddings is not
    pushed itself (the checkpoint has no lm_head weight), and vLLM's CPU build keeps a packed copy of the
    head's weight made when it was processed: without this it would keep computing logits from the
    weights it started with."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in model.modules():
        if isinstance(module, ParallelLMHead) and module.quant_method is not None:
            module.quant_method.process_weights_after_loading(module)


class VllmSampler:
    """A vLLM engine sampling from `source` (the actor, the reference, or the LoRA actor's reference view)."""

    batches_internally = True
    """sample_and_score hands it every prompt at once: vLLM schedules its own batches."""

    def __init__(
        self, source: PolicyEngine | AdapterReference, gen: GenerationConfig, *, max_prompt_tokens: int
    ) -> None:
        self.source = source
        self.engine = source.weights_engine
        self.eos_ids, self.pad_id = self.engine.eos_ids, self.engine.pad_id
        self.max_new_tokens, self.max_prompt_tokens = gen.max_new_tokens, max_prompt_tokens
        self.dtype = self.engine.dtype if gen.vllm_dtype == "auto" else getattr(torch, gen.vllm_dtype)
        self.sleeps = gen.vllm_sleep and torch.cuda.is_available()
        self.synced_version: int | None = None
        self.sync_seconds = 0.0
        """Seconds spent pushing weights since the owner last read and reset it (`time/weight_sync`)."""
        self._tp = gen.vllm_tensor_parallel_size
        self._tp_group = distributed.tensor_parallel_group(self._tp)
        self._vllm = import_vllm()  # once: it also patches vLLM's Transformers backend and its loggers
        self.llm = self._start(gen, max_prompt_tokens)

    def _start(self, gen: GenerationConfig, max_prompt_tokens: int) -> Any:
        vllm = self._vllm
        config = self.engine.module.config
        max_len = max_prompt_tokens + gen.max_new_tokens
        memory: dict[str, Any] = {"gpu_memory_utilization": gen.vllm_gpu_memory_utilization}
        if not torch.cuda.is_available():
            memory = {
                "kv_cache_memory_bytes": int(gen.vllm_kv_cache_gb * 2**30)
                or kv_cache_bytes(config, gen.batch_size, max_len, self.dtype)
            }
        settings = {
            "model": config.to_json_string(use_diff=False),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_model_len": max_len,
            "enforce_eager": gen.vllm_enforce_eager or not torch.cuda.is_available(),
            "tensor_parallel_size": self._tp,
            "enable_sleep_mode": self.sleeps,
            # A prompt prefilled in chunks rewinds its seeded generator, which CPU generators cannot do.
            "enable_chunked_prefill": torch.cuda.is_available(),
            **memory,
        }

        def start() -> Any:
            config_dir = tempfile.mkdtemp(prefix="vbon-vllm-")  # the engine reads its config there once
            atexit.register(shutil.rmtree, config_dir, True)
            config.to_json_file(os.path.join(config_dir, "config.json"))
            with _random_state_kept(), _transformers_zero3_off():
                llm = vllm.LLM(
                    model=config_dir,
                    skip_tokenizer_init=True,
                    load_format="dummy",  # the weights come from the policy engine (`_sync`)
                    generation_config="vllm",  # no repetition penalty or other defaults from the checkpoint
                    logprobs_mode="processed_logprobs",  # log softmax(logits / T), the distribution sampled
                    distributed_executor_backend="external_launcher",
                    seed=0,  # unused: every request carries its own seed
                    **{key: value for key, value in settings.items() if key != "model"},
                )
            # Its shutdown at exit would destroy the job's process group behind `vbon`'s own teardown.
            finalizer = getattr(llm.llm_engine.engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            return llm

        return _pooled_engine(self, settings, start)

    @property
    def _runner(self) -> Any:
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def _sync(self) -> None:
        """Push the source's weights if they changed since the last push (a collective under ZeRO-3)."""
        version = self.engine.weights_version
        if version == self.synced_version:
            return
        start = time.perf_counter()
        # After a first full push only the trainable blocks can have changed; a level-2 sleep drops all.
        changed_only = self.synced_version is not None and self.engine.trainable
        weights = checkpoint_weights(self.source, changed_only=changed_only)
        self._runner.reload_weights(weights_iterator=weights)
        _refresh_output_heads(self._runner.get_model())
        self.synced_version = version
        self.sync_seconds += time.perf_counter() - start

    def _check_lengths(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """The engine's max_model_len is data.max_prompt_tokens + generation.max_new_tokens as they were when
        it started. Past either, vLLM refuses a prompt longer than the whole in its own terms, and stops an
        answer at max_model_len without a word (cut short, as if it reached max_new_tokens)."""
        if max_new_tokens > self.max_new_tokens:
            raise VbonError(
                f"generation.max_new_tokens: the vLLM engine was started for answers of at most "
                f"{self.max_new_tokens} tokens, asked for {max_new_tokens}"
            )
        if prompt_tokens > self.max_prompt_tokens:
            raise VbonError(
                f"data.max_prompt_tokens: the vLLM engine was started for prompts of at most "
                f"{self.max_prompt_tokens} tokens, given one of {prompt_tokens}"
            )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        *,
        temperature: float,
        max_new_tokens: int,
        top_p: float = 1.0,
        top_k: int = 0,
        min_new_tokens: int = 0,
        gather_params: bool = True,
        record_logprobs: bool = True,
    ) -> Rollout:
        """One answer per prompt row, as `PolicyEngine.generate` returns it, always with the sampler's
        log-probs (they cost nothing here). Call on every rank (weight pushes are collectives)."""
        del gather_params, record_logprobs  # vLLM holds whole weights and always reports log-probs
        prompts = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(prompt_ids.cpu(), prompt_attention_mask.cpu(), strict=True)
        ]
        self._check_lengths(max(map(len, prompts), default=0), max_new_tokens)
        if self.sleeps:
            self.llm.wake_up(tags=["weights"])
        self._sync()
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        vllm = self._vllm
        # Drawn from torch's generator: checkpointed with the run, so a resumed run samples the same answers.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        mine = slice(0, len(prompts))
        if self._tp > 1:  # the engine's ranks must submit the same requests
            prompts, seeds, mine = distributed.tensor_parallel_requests(self._tp_group, prompts, seeds)
        params = [
            vllm.SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                min_tokens=min_new_tokens,
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's own log-prob
                stop_token_ids=self.eos_ids,
                ignore_eos=True,  # stop at exactly `eos_ids` (the HF path's), not at the model's own
                seed=seed,
                detokenize=False,
            )
            for seed in seeds
        ]
        requests = [vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)[mine]
        if self.sleeps:
            self.llm.sleep(level=2 if self.engine.trainable else 1)
            if self.engine.trainable:  # level 2 dropped the weights: the next call pushes them all
                self.synced_version = None
        return self._rollout(prompt_ids, prompt_attention_mask, [out.outputs[0] for out in outputs])

    def _rollout(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: list[Any]) -> Rollout:
        width = max(1, max(len(answer.token_ids) for answer in answers))
        tokens = torch.full((len(answers), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(answers), width)
        for row, answer in enumerate(answers):
            ids = list(answer.token_ids)
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[row, : len(ids)] = torch.tensor(
                [step[token].logprob for step, token in zip(answer.logprobs, ids, strict=True)]
            )
        device = prompt_ids.device
        return finish_rollout(
            torch.cat([prompt_ids, tokens.to(device)], dim=1),
            prompt_mask,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            response_length=distributed.all_reduce_max(width),
            sampled=(logprobs.to(device), None),
            sampler_dtype=self.dtype,
        )
