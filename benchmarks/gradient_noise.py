"""Gradient noise scale of the SmolLM2 demo's vBoN policy gradient at the start of training.

    python benchmarks/gradient_noise.py --refcache DIR [--prompts 32] [--k 8]

At pi = pi_ref the cached reference answers are on-policy samples, so no generation is needed: for P
training prompts, the first K cached answers of each get the demo's RLOO advantage (leave-one-out over the
K answers of log F_hat(r) against the prompt's M cached rewards; the KL term is 0 at pi_ref), and each
answer's gradient g_i of A_i * mean_t log pi(y_t) is taken one at a time. With n = P * K of them:
    |G|^2  = (|sum g_i|^2 - sum |g_i|^2) / (n (n - 1))     unbiased squared norm of the true gradient
    tr S   = (sum |g_i|^2 - n |mean g|^2) / (n - 1)          per-answer noise (trace of the covariance)
    B_noise = tr S / |G|^2                                    (McCandlish et al. 2018, "B_simple")
B_noise is the batch (in answers) at which a step's gradient is as much signal as noise. Reported for all
weights and for groups (top 4 blocks, embeddings, kinds of linear layer) in benchmarks/gradient_noise.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vbon_ds.commands.demo import demo_config
from vbon_ds.core import bon, losses
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.refcache import open_refcache
from vbon_ds.models.loading import load_causal_lm, load_tokenizer

HERE = Path(__file__).resolve().parent


def groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refcache", type=Path, required=True, help="the smollm2 demo's reference cache")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=8, help="answers per prompt (algo.samples_per_prompt)")
    args = parser.parse_args()
    cfg = demo_config("smollm2", "/tmp/vbon_gradient_noise", [f"train.refcache_dir={args.refcache}"])
    cache = open_refcache(cfg)
    prompts = load_prompts(cfg.data, "train")
    tok = load_tokenizer(cfg.model.actor, gguf_file=cfg.model.gguf_file)
    model = load_causal_lm(cfg.model.actor, dtype=torch.float32, gguf_file=cfg.model.gguf_file)
    model.train()
    params = groups(model)
    sums = {name: [torch.zeros_like(p) for p in ps] for name, ps in params.items()}
    sq = dict.fromkeys(params, 0.0)
    n = 0
    t0 = time.perf_counter()
    for pid, text in list(zip(prompts.ids, prompts.texts, strict=True))[: args.prompts]:
        record = cache.record(pid)
        refs = torch.tensor(sorted(record.rewards), dtype=torch.float64)
        rewards = torch.tensor(record.rewards[: args.k], dtype=torch.float64)
        advantages = losses.leave_one_out(bon.log_cdf(rewards, refs, presorted=True), args.k)
        prompt_ids = tok(text).input_ids
        for answer, adv in zip(record.token_ids[: args.k], advantages.tolist(), strict=True):
            ids = torch.tensor([prompt_ids + list(answer)])
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, len(prompt_ids) :, None]).mean()
            model.zero_grad(set_to_none=False)
            (adv * logp).backward()
            for name, ps in params.items():
                grads = [p.grad for p in ps]
                sq[name] += sum(float(g.pow(2).sum()) for g in grads)
                for acc, g in zip(sums[name], grads, strict=True):
                    acc.add_(g)
            n += 1
    lines = [
        "# Gradient noise scale of the demo's vBoN policy gradient at pi_ref",
        "",
        f"`python benchmarks/gradient_noise.py`: {n} cached reference answers ({args.prompts} training "
        f"prompts x {args.k}), RLOO advantage of log F_hat (M = {refs.numel()}); "
        f"{time.perf_counter() - t0:.0f} s.",
        "",
        "| weights | \\|G\\|^2 (signal) | tr S (noise per answer) | B_noise = tr S / \\|G\\|^2 (answers) |",
        "|---|---|---|---|",
    ]
    for name in params:
        total_sq = sum(float(s.pow(2).sum()) for s in sums[name])
        signal = (total_sq - sq[name]) / (n * (n - 1))
        noise = (sq[name] - total_sq / n) / (n - 1)
        scale = f"{noise / signal:.0f}" if signal > 0 else f"> {n} (signal estimate <= 0)"
        lines.append(f"| {name} | {signal:.3g} | {noise:.3g} | {scale} |")
    report = "\n".join(lines) + "\n"
    (HERE / "gradient_noise.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
