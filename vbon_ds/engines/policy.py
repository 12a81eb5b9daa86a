"""`PolicyEngine`: the actor (trainable) or the reference policy (frozen) - rollouts and token log-probs.

    rollout = actor.generate(prompt_ids, prompt_mask, temperature=0.7, top_p=1.0, top_k=0,
                             max_new_tokens=50, min_new_tokens=0, gather_params=True)
    logp = actor.response_logprobs(rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7)
    actor.backward(loss); actor.step()

Shapes: prompts are left-padded to P tokens, responses right-padded with pad to R tokens; every per-token
tensor is [B, R] over response positions only, float32, zero where `response_mask` is 0.

Under ZeRO-3 `generate` is a collective: every rank must call it the same number of times. With
`gather_params` the whole model is gathered once per call (fast; needs the full model in memory), else
layers are gathered per forward with `synced_gpus` (ranks that finish early keep stepping until all have).
Either way responses are padded to the longest response over all ranks, so R is the same on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

from vbon_ds.engines import distributed
from vbon_ds.engines.base import DeepSpeedModel, position_ids, probe_batch, require_repeatable
from vbon_ds.engines.lm_head import fusable_lm_head, logit_scale
from vbon_ds.errors import VbonError


@dataclass
class Rollout:
    """Sampled answers of one generate call."""

    sequences: torch.Tensor
    """[B, P + R] token ids: left-padded prompt, then the response right-padded with pad."""
    attention_mask: torch.Tensor
    """[B, P + R]: the prompt mask, then `response_mask`."""
    response_mask: torch.Tensor
    """[B, R] 1 for response tokens up to and including the first EOS, 0 after it."""
    prompt_length: int
    """P: prompt positions (the response starts at this column)."""
    ended_with_eos: torch.Tensor
    """[B] bool: the response stopped at EOS (False: cut at max_new_tokens)."""
    sampled_logprobs: torch.Tensor | None = None
    """[B, R] float32 log-prob of each response token under the distribution it was drawn from, before
    top-k/top-p (softmax(logits / temperature)), 0 where `response_mask` is 0; None when not recorded."""
    sampled_entropy: torch.Tensor | None = None
    """[B, R] entropy of that distribution at each response position, like `sampled_logprobs`."""
    sampler_dtype: torch.dtype | None = None
    """The precision the sampling engine computed its logits in (None when no log-probs were recorded): a
    sampler in another precision than the trainer draws from a slightly different policy."""

    @property
    def responses(self) -> torch.Tensor:
        """[B, R] response token ids."""
        return self.sequences[:, self.prompt_length :]


def finish_rollout(
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    eos_ids: list[int],
    pad_id: int,
    response_length: int,
    sampled: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    sampler_dtype: torch.dtype | None = None,
) -> Rollout:
    """Masks of a sampler's output, padded to `response_length` response tokens, with the ([B, R'] log-probs,
    entropies or None) `sampled` recorded while sampling, if any, in `sampler_dtype`."""
    prompt_length = prompt_mask.shape[1]
    response = sequences[:, prompt_length:]
    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device))
    # Tokens after the first EOS are padding that `generate` appended while other rows were still going.
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    response_mask = (~after_eos).long()
    pad = response_length - response.shape[1]
    response = torch.nn.functional.pad(response, (0, pad), value=pad_id)
    response_mask = torch.nn.functional.pad(response_mask, (0, pad), value=0)
    recorded = [
        None if values is None else torch.nn.functional.pad(values, (0, pad)) * response_mask
        for values in (sampled or (None, None))
    ]
    return Rollout(
        sequences=torch.cat([sequences[:, :prompt_length], response], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), response_mask], dim=1),
        response_mask=response_mask,
        prompt_length=prompt_length,
        ended_with_eos=is_eos.any(dim=1),
        sampled_logprobs=recorded[0],
        sampled_entropy=recorded[1],
        sampler_dtype=sampler_dtype if sampled else None,
    )


class SampledTokenLogprobs(LogitsProcessor):
    """Records, while `generate` runs, each sampled token's log-prob under softmax(logits / temperature) and
    that distribution's entropy, from the logits generation computes anyway: a rollout's old log-probs
    without another forward over it. Holds one step's [B, V] at a time, never [B, R, V].

    `generate` runs custom processors after its own and before temperature, top-k and top-p, so this sees
    the model's raw logits when every built-in processor is off: `sampling_config` turns all of them off,
    and `PolicyEngine.generate` then applies min_new_tokens (EOS masked) after this, as a forward sees it."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self._last_step: torch.Tensor | None = None
        self._logprobs: list[torch.Tensor] = []
        self._entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])  # the token sampled from the previous step's distribution
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self._entropy.append(torch.special.entr(logp.exp()).sum(-1))
        self._last_step = logp
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self._last_step is not None:
            self._logprobs.append(self._last_step.gather(1, tokens[:, None]).squeeze(1))
            self._last_step = None

    def result(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, R] log-probs, [B, R] entropies) of the R tokens generated into `sequences`."""
        self._take(sequences[:, -1])
        return torch.stack(self._logprobs, 1), torch.stack(self._entropy, 1)


def sampling_config(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
) -> GenerationConfig:
    """Every setting that shapes the next-token distribution, from our settings only: tokens are drawn from
    softmax(logits / temperature), restricted to the top-k / top-p set (and EOS masked before
    min_new_tokens) only when those are on. Every log-prob, KL and BoN formula (the recorder, training
    forwards, evaluation, the reference cache) is of the full softmax(logits / temperature), so they hold
    only with top_p=1, top_k=0, min_new_tokens=0, which config loading enforces for every job; other
    values are for direct engine use (benchmarks) only. Use it under `checkpoint_settings_ignored`."""
    return GenerationConfig(
        do_sample=True,
        num_beams=1,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        sequence_bias=None,
        exponential_decay_length_penalty=None,
        renormalize_logits=False,
        remove_invalid_values=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
        num_return_sequences=1,
    )


@contextlib.contextmanager
def checkpoint_settings_ignored(model: torch.nn.Module) -> Iterator[None]:
    """Hide the checkpoint's generation_config.json from `generate` for the duration.

    transformers fills every setting a call leaves unset (and, in some versions, every setting left at its
    default) from `model.generation_config`, so a checkpoint's repetition_penalty or min_p would otherwise
    reach our rollouts; a blank config there leaves only the settings we pass.
    """
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@contextlib.contextmanager
def _head_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect what the output-embedding module returns during the block, as the model's forward sees it.

    The hook is registered after DeepSpeed's, so under ZeRO-3 a collected tensor carries its backward hook
    (which gathers the head's weight again for the backward pass). Whatever the model does to the head's
    output afterwards (Granite divides it by logits_scaling, Cohere multiplies it by logit_scale) is not in
    it.
    """
    outputs: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        yield outputs
    finally:
        hook.remove()


@contextlib.contextmanager
def _lm_head_returns_logprobs(
    model: torch.nn.Module, labels: torch.Tensor, temperature: float, return_entropy: bool
) -> Iterator[list[torch.Tensor]]:
    """Make the output-embedding module return token log-probs of `labels` (fused) instead of logits, under
    softmax(hidden @ weight.T / temperature); yields the list that receives the head's output.

    The fused kernel runs inside the head's own forward, so ZeRO-3's module hooks gather its partitioned
    weight for the forward and gather it again for the backward (which runs long after this call returns);
    a gather around the call could not cover the backward. Memory: the whole head weight, vocab x hidden x
    dtype bytes, on every rank while the head's forward (and later its backward) runs.
    """
    from vbon_ds.kernels import linear_token_logprobs

    head = model.get_output_embeddings()

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        out = linear_token_logprobs(hidden, head.weight, labels, temperature, return_entropy=return_entropy)
        return torch.stack(out, dim=-1) if return_entropy else out

    head.forward = forward
    try:
        with _head_outputs(model) as outputs:
            yield outputs
    finally:
        del head.forward


class PolicyEngine(DeepSpeedModel):
    """A causal LM engine with rollouts and response-token log-probs."""

    def __init__(
        self, ds_engine: object, hf_ds_config: object, *, trainable: bool, eos_ids: list[int], pad_id: int
    ) -> None:
        super().__init__(ds_engine, hf_ds_config, trainable=trainable)
        try:
            fusable_lm_head(self.module)
        except ValueError as err:
            raise VbonError(str(err)) from None
        self.logit_scale = self._measured_logit_scale()
        """s: the model's logits are s x its lm head's output (1 for most models), measured at start-up."""
        self.eos_ids = eos_ids
        self.pad_id = pad_id

    def _measured_logit_scale(self) -> float:
        """`lm_head.logit_scale` on one probe batch; a trainable engine also checks that its training-mode
        forward is repeatable."""
        model_type = getattr(self.module.config, "model_type", type(self.module).__name__)
        ids, mask = probe_batch(distributed.device())
        logits, head_output = self._logits_and_head_output(ids, mask, model_type)
        if self.trainable:
            again, _ = self._logits_and_head_output(ids, mask, model_type)
            require_repeatable(logits, again, f"actor ({model_type})")
        try:
            return logit_scale(logits, head_output, model_type)
        except ValueError as err:
            raise VbonError(str(err)) from None

    @torch.no_grad()
    def _logits_and_head_output(
        self, ids: torch.Tensor, mask: torch.Tensor, model_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits for one batch and its lm head's output in the same forward (a collective)."""
        with _head_outputs(self.module) as outputs:
            logits = self.ds(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if len(outputs) != 1:
            raise VbonError(
                f"model type {model_type!r}: its lm head ran {len(outputs)} times in one forward; the fused "
                "log-prob path needs a model that computes its logits with one call of its lm head"
            )
        return logits, outputs[0]

    @property
    def dtype(self) -> torch.dtype:
        """The output layer's dtype: the precision of the logits (LoRA adapters may be in another)."""
        return self.module.get_output_embeddings().weight.dtype

    @property
    def weights_engine(self) -> PolicyEngine:
        """The engine that holds this policy's weights: the engine itself (`AdapterReference`: its actor)."""
        return self

    @property
    def adapters_on(self) -> bool:
        """Whether LoRA adapters, where the model has them, are part of this policy: always here
        (`AdapterReference`, the reference view, has them off)."""
        return True

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        *,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        gather_params: bool = True,
        record_logprobs: bool = False,
    ) -> Rollout:
        """Sample one response per prompt row (collective under ZeRO-3: call on every rank); with
        `record_logprobs` the rollout carries the sampled tokens' log-probs and entropies."""
        processors = LogitsProcessorList()
        recorded = None
        if record_logprobs:
            recorded = SampledTokenLogprobs(temperature)
            processors.append(recorded)
            if min_new_tokens:  # after the recording, which must see EOS's logit as a forward does
                processors.append(
                    MinNewTokensLengthLogitsProcessor(
                        prompt_ids.shape[1], min_new_tokens, self.eos_ids, device=prompt_ids.device
                    )
                )
        config = sampling_config(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0 if record_logprobs else min_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
        )
        synced = self.zero3 and not gather_params and distributed.world_size() > 1
        was_training = self.module.training
        # eval(): gradient checkpointing would switch the KV cache off; dropout is already disabled.
        self.module.eval()
        gather = self.unsharded() if gather_params else contextlib.nullcontext()
        try:
            with gather, checkpoint_settings_ignored(self.module):
                sequences = self.module.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_attention_mask,
                    generation_config=config,
                    synced_gpus=synced,
                    logits_processor=processors,
                )
        finally:
            self.module.train(was_training)
        generated = sequences.shape[1] - prompt_ids.shape[1]
        rollout = finish_rollout(
            sequences,
            prompt_attention_mask,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            response_length=distributed.all_reduce_max(generated),
            sampled=recorded.result(sequences) if recorded else None,
            sampler_dtype=self.dtype,
        )
        rollout.sampler_dtype = self.dtype if record_logprobs else None
        return rollout

    def response_logprobs(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int,
        temperature: float,
        return_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[B, R] float32 log-probs of the response tokens under softmax(logits / temperature) (and the
        per-token entropy with `return_entropy`), 0 where the response mask is 0; logits as the model returns
        them (its lm head's output times `logit_scale`).

        Only response positions go through the output layer, fused with the log-softmax: no [B, T, V] logits.
        Differentiable when the engine is trainable and grad is enabled.
        """
        response_mask = attention_mask[:, prompt_length:]
        labels = sequences[:, prompt_length:].masked_fill(response_mask == 0, -100)
        # Hidden state t predicts token t + 1: positions P-1 .. T-2 predict the response tokens.
        keep = torch.arange(prompt_length - 1, sequences.shape[1] - 1, device=sequences.device)
        # softmax(s x head / T) = softmax(head / (T / s)): the model's scale joins the kernel's temperature.
        head_temperature = temperature / self.logit_scale
        with _lm_head_returns_logprobs(self.module, labels, head_temperature, return_entropy) as outputs:
            self.ds(
                input_ids=sequences,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                logits_to_keep=keep,
                use_cache=False,
            )
        # The head's own output: the model's `logits` field holds it after the model's rescaling.
        (logprobs,) = outputs
        if not return_entropy:
            return logprobs
        return logprobs[..., 0], logprobs[..., 1] * response_mask
