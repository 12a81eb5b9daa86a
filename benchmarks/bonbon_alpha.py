"""BoNBoN's alpha from the gradient norms of its two terms at the start of the SmolLM2 demo's training.

    python benchmarks/bonbon_alpha.py [--prompts 32] [--micro-batch 8] [--threads 1]

BoNBoN's loss is alpha * SFT + (1 - alpha) * IPO with SFT = -mean log pi(y_w) (summed over the answer's
tokens) and IPO = mean (h - 1/(2 beta))^2 (losses.bonbon_loss). At the start pi = pi_ref, so h = 0 and the
IPO gradient is -(1/beta) grad h: it scales with the target margin 1/(2 beta) = (N-1) H_(N-1), 18.15 at
N = 8. The demo's setting (algo.name=bonbon on the smollm2 preset: N = 8, temperature 1, 24 new tokens,
LoRA rank 8, micro-batches of 8 pairs) is reproduced without DeepSpeed: for each of the first P training
prompts the reference samples N answers (at pi = pi_ref they are what the cache would hold), VADER scores
them, `offline.choose_pairs` takes the best and the worst, and per micro-batch the gradients of the SFT
and IPO terms are taken separately, for the LoRA weights the demo trains and for all weights.

The rule (docs/math.md section 5): alpha makes the two weighted terms' gradients equally large at the
start, alpha * |g_SFT| = (1 - alpha) * |g_IPO|, i.e. alpha = |g_IPO| / (|g_IPO| + |g_SFT|) with the means
of the norms over the micro-batches. Prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from vbon_ds.algorithms.offline import choose_pairs, ipo_beta
from vbon_ds.algorithms.onpolicy import answer_batch
from vbon_ds.algorithms.rollout import encode_prompts, response_texts, response_token_ids
from vbon_ds.commands.demo import demo_config
from vbon_ds.core import losses
from vbon_ds.data.prompts import load_prompts
from vbon_ds.data.rewards import get_reward_function
from vbon_ds.engines.base import position_ids
from vbon_ds.engines.builders import generation_eos_ids
from vbon_ds.engines.policy import checkpoint_settings_ignored, finish_rollout, sampling_config
from vbon_ds.models.adapters import apply_trainable_subset, lora_layers
from vbon_ds.models.loading import load_causal_lm, load_tokenizer


def sample_answers(model, tok, cfg, texts: list[str]) -> tuple[list[list[int]], list[str]]:
    """N answers per prompt from the reference (the demo's sampling settings); token ids and texts."""
    gen, n = cfg.generation, cfg.vbon.n
    repeated = [t for t in texts for _ in range(n)]
    prompt_ids, prompt_mask = encode_prompts(tok, repeated, cfg.data.max_prompt_tokens)
    eos_ids = generation_eos_ids(model, tok)
    config = sampling_config(
        temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens, eos_ids=eos_ids, pad_id=tok.pad_token_id,
    )  # fmt: skip
    with torch.no_grad(), checkpoint_settings_ignored(model):
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    rollout = finish_rollout(
        sequences, prompt_mask, eos_ids=eos_ids, pad_id=tok.pad_token_id,
        response_length=sequences.shape[1] - prompt_ids.shape[1],
    )  # fmt: skip
    return response_token_ids(rollout), response_texts(tok, rollout)


def sequence_logp(model, tok, cfg, prompts: list[str], answers: list[list[int]]) -> torch.Tensor:
    """[B] log pi(y) summed over the answer's tokens under softmax(logits / temperature), as in training."""
    batch = answer_batch(tok, prompts, answers, cfg.data.max_prompt_tokens)
    logits = model(
        input_ids=batch.sequences,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
    ).logits[:, batch.prompt_length - 1 : -1]
    logp = torch.log_softmax(logits.float() / cfg.generation.temperature, -1)
    token_logp = logp.gather(-1, batch.sequences[:, batch.prompt_length :, None])[..., 0]
    return losses.masked_sum(token_logp, batch.response_mask, dim=1)


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def measure(cfg, num_prompts: int, micro_batch: int) -> list[str]:
    """Sample, pair and measure on `cfg` (a demo config with algo.name=bonbon); the report's lines."""
    beta, n = ipo_beta(cfg), cfg.vbon.n
    tok = load_tokenizer(cfg.model.actor, gguf_file=cfg.model.gguf_file)
    model = load_causal_lm(cfg.model.actor, dtype=torch.float32, gguf_file=cfg.model.gguf_file)
    apply_trainable_subset(model, cfg.model, cfg.train.seed, lora=True)
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and lora_layers(model), "the demo preset trains LoRA adapters"
    model.requires_grad_(True)  # the base weights too, for the all-weights row (LoRA B = 0: same forward)
    model.eval()  # no dropout; the forward is the training forward's
    groups = {
        f"LoRA rank {cfg.model.lora_rank} (what the demo trains)": lora,
        "all weights": list(model.parameters()),
    }

    t0 = time.perf_counter()
    texts = load_prompts(cfg.data, "train").texts[:num_prompts]
    answers, answer_texts = sample_answers(model, tok, cfg, texts)
    rewards = get_reward_function(cfg.reward.function)([t for t in texts for _ in range(n)], answer_texts)
    per_prompt = [rewards[i * n : (i + 1) * n] for i in range(len(texts))]
    pairs = choose_pairs(per_prompt, list(range(len(texts))), n, torch.Generator().manual_seed(0))
    sampled_s = time.perf_counter() - t0

    norms = {name: {"sft": [], "ipo": []} for name in groups}
    values = {"sft": [], "ipo": []}
    for start in range(0, len(pairs), micro_batch):
        chunk = pairs[start : start + micro_batch]
        prompts = [texts[p.prompt_index] for p in chunk]
        chosen = sequence_logp(
            model, tok, cfg, prompts, [answers[p.prompt_index * n + p.chosen] for p in chunk]
        )
        rejected = sequence_logp(
            model, tok, cfg, prompts, [answers[p.prompt_index * n + p.rejected] for p in chunk]
        )
        # pi = pi_ref at the start: the reference log-probs are the policy's own, held fixed
        terms = {
            "sft": -chosen.mean(),
            "ipo": losses.ipo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta),
        }
        for term, loss in terms.items():
            values[term].append(loss.item())
            for name, params in groups.items():
                norms[name][term].append(grad_norm(loss, params))
    measured_s = time.perf_counter() - t0 - sampled_s

    mean = statistics.fmean
    lines = [
        "## BoNBoN's alpha from its terms' gradient norms (`benchmarks/bonbon_alpha.py`)",
        "",
        f"The demo with algo.name=bonbon at the start (pi = pi_ref): {len(pairs)} best/worst pairs of "
        f"N = {n} answers ({len(texts)} training prompts, temperature {cfg.generation.temperature}, "
        f"{cfg.generation.max_new_tokens} new tokens, {cfg.reward.function}), micro-batches of {micro_batch} "
        f"pairs, beta = {beta:.5f} (target margin 1/(2 beta) = {1 / (2 * beta):.2f}); "
        f"{torch.get_num_threads()} thread(s), sampling {sampled_s:.0f} s, gradients {measured_s:.0f} s.",
        "",
        f"{sum(p.chosen_reward == p.rejected_reward for p in pairs)} of the {len(pairs)} pairs tie (best and "
        "worst reward equal: zero margin, no IPO gradient). "
        f"Loss values per micro-batch: SFT (summed NLL of y_w) mean {mean(values['sft']):.1f} "
        f"(range {min(values['sft']):.1f} to {max(values['sft']):.1f}); IPO mean {mean(values['ipo']):.1f} "
        f"(range {min(values['ipo']):.1f} to {max(values['ipo']):.1f}).",
        "",
        "| weights | \\|g_SFT\\| per micro-batch | \\|g_IPO\\| per micro-batch | mean ratio IPO/SFT | "
        "alpha = \\|g_IPO\\| / (\\|g_IPO\\| + \\|g_SFT\\|) |",
        "|---|---|---|---|---|",
    ]
    for name in groups:
        sft, ipo = norms[name]["sft"], norms[name]["ipo"]
        lines.append(
            f"| {name} | {', '.join(f'{v:.3g}' for v in sft)} | {', '.join(f'{v:.3g}' for v in ipo)} | "
            f"{mean(ipo) / mean(sft):.1f} | {mean(ipo) / (mean(ipo) + mean(sft)):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32, help="training prompts, one pair each")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per micro-batch (the demo's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = demo_config("smollm2", tempfile.mkdtemp(prefix="vbon_bonbon_alpha_"), ["algo.name=bonbon"])
    print("\n".join(measure(cfg, args.prompts, args.micro_batch)))


if __name__ == "__main__":
    main()
