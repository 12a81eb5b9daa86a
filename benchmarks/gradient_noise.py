"""Gradient noise scale of the on-policy policy gradient at the start of training (pi = pi_ref).

    python benchmarks/gradient_noise.py --refcache DIR [--prompts 32] [--k 8]   # the smollm2 demo's cache

At pi = pi_ref the cached reference answers are on-policy samples, so no generation is needed: for P
training prompts, the first K cached answers of each are scored as the trainer scores a step of K answers
per prompt (onpolicy.score: the run's objective reward, log F_hat against the prompt's other M - K cached
rewards for vBoN; RLOO advantages; the KL term is 0 at pi_ref), and each answer's gradient g_i of its
policy-gradient loss (A_i * sum_t log pi(y_t) / max_new_tokens, the trainer's normalisation) is taken one
at a time. With n = P * K of them:
    |G|^2  = (|sum g_i|^2 - sum |g_i|^2) / (n (n - 1))     unbiased squared norm of the true gradient
    tr S   = (sum |g_i|^2 - n |mean g|^2) / (n - 1)          per-answer noise (trace of the covariance)
    B_noise = tr S / |G|^2                                    (McCandlish et al. 2018, "B_simple")
B_noise is the batch (in answers) at which a step's gradient is as much signal as noise. This script reports
it for all weights and for groups (top 4 blocks, embeddings, kinds of linear layer) in
benchmarks/gradient_noise.md; benchmarks/gpu_science.py measures it for the weights a run trains.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vbon_ds.algorithms import onpolicy
from vbon_ds.algorithms.objective import objective_beta
from vbon_ds.config import ExperimentConfig
from vbon_ds.core import losses
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.refcache import open_refcache
from vbon_ds.engines.builders import generation_eos_ids
from vbon_ds.models.loading import load_causal_lm, load_tokenizer

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class NoiseScale:
    """The simple gradient noise scale of one group of weights, from `answers` per-answer gradients."""

    answers: int
    signal: float
    """|G|^2, unbiased: the squared norm of the expected gradient."""
    noise: float
    """tr S: the trace of one answer's gradient covariance."""

    @property
    def scale(self) -> float | None:
        """B_noise = tr S / |G|^2 in answers; None when the signal estimate is not positive (too few answers
        to see it)."""
        return self.noise / self.signal if self.signal > 0 else None

    def describe(self) -> str:
        return f"{self.scale:.0f}" if self.scale is not None else f"> {self.answers} (signal estimate <= 0)"


def noise_scale(squared_norm_of_sum: float, sum_of_squared_norms: float, n: int) -> NoiseScale:
    """B_simple from n per-sample gradients g_i given |sum g_i|^2 and sum |g_i|^2 (formulas above)."""
    if n < 2:
        raise ValueError(f"the noise scale needs at least 2 gradients, got {n}")
    signal = (squared_norm_of_sum - sum_of_squared_norms) / (n * (n - 1))
    noise = (sum_of_squared_norms - squared_norm_of_sum / n) / (n - 1)
    return NoiseScale(n, signal, noise)


class GradientSums:
    """Running sum of the per-answer gradients and of their squared norms, per group of weights."""

    def __init__(self, groups: dict[str, list[torch.nn.Parameter]]) -> None:
        self.groups = groups
        self.sums = {
            name: [torch.zeros_like(p, dtype=torch.float64) for p in ps] for name, ps in groups.items()
        }
        self.squares = dict.fromkeys(groups, 0.0)
        self.count = 0

    def add(self) -> None:
        """Add the gradients now in the groups' .grad (one answer's)."""
        for name, params in self.groups.items():
            grads = [p.grad.double() for p in params]
            self.squares[name] += float(sum(g.pow(2).sum() for g in grads))
            for total, g in zip(self.sums[name], grads, strict=True):
                total.add_(g)
        self.count += 1

    def scales(self) -> dict[str, NoiseScale]:
        return {
            name: noise_scale(
                float(sum(s.pow(2).sum() for s in self.sums[name])), self.squares[name], self.count
            )
            for name in self.groups
        }


def measure(
    cfg: ExperimentConfig,
    model: torch.nn.Module,
    groups: dict[str, list[torch.nn.Parameter]],
    prompts: int,
    k: int | None = None,
) -> dict[str, NoiseScale]:
    """The noise scale of each group's weights in `model` (pi_ref: the reference's weights, with whatever
    adapters the run adds still at their starting values) over the first `prompts` training prompts of
    `cfg` with k (default algo.samples_per_prompt) cached answers each."""
    k = k or cfg.algo.samples_per_prompt
    cache = open_refcache(cfg)
    train = load_prompts(cfg.data, "train")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.actor, gguf_file=cfg.model.gguf_file)
    eos = torch.tensor(generation_eos_ids(model, tok))
    model.eval()  # no dropout, as in the trainer's engines
    for p in model.parameters():
        p.requires_grad_(False)
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    sums = GradientSums(groups)
    device = next(model.parameters()).device
    for pid, text in list(zip(train.ids, train.texts, strict=True))[:prompts]:
        record = cache.record(pid)
        if len(record.rewards) <= k:
            raise ValueError(f"vbon.num_ref_samples must exceed the {k} answers per prompt measured")
        answers, refs = record.token_ids[:k], sorted(record.rewards[k:])  # samples independent of F_hat
        batch = onpolicy.answer_batch(tok, [text] * k, answers, cfg.data.max_prompt_tokens)
        ended = torch.tensor([bool(a) and a[-1] in eos for a in answers])
        scores = onpolicy.score(
            cfg,
            torch.tensor(record.rewards[:k], dtype=torch.float32),
            torch.tensor([refs] * k, dtype=torch.float32),
            [pid] * k,
            ended,
        )
        mask = batch.response_mask.cpu()
        zero_kl = torch.zeros(mask.shape)
        advantages = losses.rloo_advantages(
            scores.objective_rewards, zero_kl, mask, objective_beta(cfg), k, cfg.algo.whiten_advantages
        )
        for row in range(k):
            _backward_one(model, batch, row, float(advantages[row]), cfg, device)
            sums.add()
    return sums.scales()


def _backward_one(
    model: torch.nn.Module,
    batch: onpolicy.TokenBatch,
    row: int,
    advantage: float,
    cfg: ExperimentConfig,
    device: torch.device,
) -> None:
    """One answer's policy-gradient loss, backward (the gradients replace the previous answer's)."""
    rows = batch.rows(torch.tensor([row]))
    sequences, attention = rows.sequences.to(device), rows.attention_mask.to(device)
    start = rows.prompt_length
    logits = model(input_ids=sequences, attention_mask=attention).logits[:, start - 1 : -1].float()
    logp = torch.log_softmax(logits / cfg.generation.temperature, -1)
    tokens = logp.gather(-1, sequences[:, start:, None]).squeeze(-1)
    per_answer = (tokens * rows.response_mask.to(device)).sum() / cfg.generation.max_new_tokens
    model.zero_grad(set_to_none=False)
    (-advantage * per_answer).backward()


def weight_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The demo's report: every weight, and groups of them (LLaMA-style names, as SmolLM2's)."""
    layers = model.model.layers
    top = [p for layer in layers[-4:] for p in layer.parameters()] + list(model.model.norm.parameters())

    def projections(*names: str) -> list[torch.nn.Parameter]:
        return [p for name, p in model.named_parameters() if name.rsplit(".", 2)[-2] in names]

    # LoRA's gradient at initialisation (B = 0) is a fixed random projection of its modules' weight
    # gradient, which keeps the ratio of noise to signal: these rows predict LoRA's noise scale by target
    return {
        "all weights": list(model.parameters()),
        "top 4 blocks + final norm": top,
        "embeddings (tied head)": list(model.model.embed_tokens.parameters()),
        "attention q, v (LoRA's default targets)": projections("q_proj", "v_proj"),
        "attention k, o": projections("k_proj", "o_proj"),
        "MLP gate, up, down": projections("gate_proj", "up_proj", "down_proj"),
        "every linear layer (LoRA on all)": projections(
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ),
    }


def report_lines(scales: dict[str, NoiseScale]) -> list[str]:
    """The markdown table of noise scales by group."""
    lines = [
        "| weights | \\|G\\|^2 (signal) | tr S (noise per answer) | B_noise = tr S / \\|G\\|^2 (answers) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {s.signal:.3g} | {s.noise:.3g} | {s.describe()} |" for name, s in scales.items()]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    from vbon_ds.commands.demo import demo_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refcache", type=Path, required=True, help="the smollm2 demo's reference cache")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="answers per prompt (algo.samples_per_prompt)")
    args = parser.parse_args(argv)
    cfg = demo_config("smollm2", "/tmp/vbon_gradient_noise", [f"train.refcache_dir={args.refcache}"])
    model = load_causal_lm(cfg.model.actor, dtype=torch.float32, gguf_file=cfg.model.gguf_file)
    start = time.perf_counter()
    scales = measure(cfg, model, weight_groups(model), args.prompts, args.k)
    lines = [
        "# Gradient noise scale of the demo's vBoN policy gradient at pi_ref",
        "",
        f"`python benchmarks/gradient_noise.py`: {args.prompts * args.k} cached reference answers "
        f"({args.prompts} training prompts x {args.k}), RLOO advantage of log F_hat (M = "
        f"{cfg.vbon.num_ref_samples}, the other M - K rewards as the references); "
        f"{time.perf_counter() - start:.0f} s.",
        "",
        *report_lines(scales),
    ]
    report = "\n".join(lines) + "\n"
    (HERE / "gradient_noise.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
