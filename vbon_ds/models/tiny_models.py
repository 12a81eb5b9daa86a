"""Tiny random models and tokenizers saved to a directory, loadable by path exactly like a hub id.

The `tiny` demo preset and the tests use them: a few KB each, built in well under a second, no network.
`tokenizer="gpt2"` gives instead the real ~50k-token GPT-2 byte-level BPE (from the ranks that the
`openai-whisper` package ships; `launch/setup_env.sh` installs it for development), laid out as Pythia's
tokenizers are: "<|endoftext|>" is EOS and BOS, there is no pad token, and the model's vocabulary is padded
to a multiple of 128 beyond the tokenizer's. With `arch="gpt_neox"` that is a Pythia model in miniature.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    CohereConfig,
    FalconH1Config,
    GPT2Config,
    GPTNeoXConfig,
    GraniteConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
SENTENCES = (
    "the movie was great and the actors were wonderful",
    "i did not like the plot at all, it was boring",
    "a lovely evening with friends and good food",
    "the weather today is grey and cold",
    "summarize: the cat sat on the mat and looked out of the window",
    "what a fantastic, happy, beautiful day it is",
)


def make_tiny_tokenizer(
    out_dir: str | Path, vocab_size: int = 300, corpus: Sequence[str] = SENTENCES
) -> PreTrainedTokenizerFast:
    """A byte-level BPE (decodes back to the exact text) with one special token used as EOS, BOS and pad."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(corpus), vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )
    tok.save_pretrained(str(out_dir))
    return tok


def _gpt2_ranks_file() -> Path:
    spec = importlib.util.find_spec("whisper")
    path = Path(spec.origin).parent / "assets" / "gpt2.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise RuntimeError(
            "the GPT-2 BPE ranks come with openai-whisper: pip install --no-deps openai-whisper "
            "(launch/setup_env.sh does this for the dev extras)"
        )
    return path


@functools.lru_cache(maxsize=1)
def _gpt2_bpe_json() -> str:
    """GPT-2's byte-level BPE (50257 tokens) as a `tokenizers` JSON string, built from the tiktoken ranks."""
    ranks: dict[bytes, int] = {}
    for line in _gpt2_ranks_file().read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    # Byte-level BPE spells each byte as a printable character (GPT-2's bytes_to_unicode table).
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}

    def spell(token: bytes) -> str:
        return "".join(char[b] for b in token)

    def last_merge(token: bytes, rank: int) -> tuple[bytes, bytes]:
        # Replay BPE on the token's bytes with the merges ranked before it: the last two parts are the pair
        # whose merge made the token.
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = min(
                (r, i)
                for i in range(len(parts) - 1)
                if (r := ranks.get(parts[i] + parts[i + 1], rank)) < rank
            )[1]
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return parts[0], parts[1]

    merges = [
        tuple(map(spell, last_merge(token, rank)))
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
        if len(token) > 1
    ]
    bpe = Tokenizer(models.BPE({spell(t): r for t, r in ranks.items()}, merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(EOS, special=True)])
    return bpe.to_str()


def make_gpt2_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """GPT-2's 50257-token byte-level BPE with Pythia's conventions: EOS = BOS = "<|endoftext|>", no pad."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_gpt2_bpe_json()), eos_token=EOS, bos_token=EOS, unk_token=EOS
    )
    tok.save_pretrained(str(out_dir))
    return tok


def _make_tokenizer(
    out_dir: Path, tokenizer: str, vocab_size: int, corpus: Sequence[str]
) -> PreTrainedTokenizerFast:
    if tokenizer == "tiny":
        return make_tiny_tokenizer(out_dir, vocab_size, corpus)
    if tokenizer == "gpt2":
        return make_gpt2_tokenizer(out_dir)
    raise ValueError(f"unknown tiny tokenizer {tokenizer!r} (allowed: tiny, gpt2)")


def _model_vocab(tok: PreTrainedTokenizerFast, tokenizer: str) -> int:
    """The embedding rows: the tokenizer's size, padded to a multiple of 128 for the big one (as Pythia)."""
    return len(tok) if tokenizer == "tiny" else -(-len(tok) // 128) * 128


def tiny_config(
    arch: str, vocab_size: int, eos_id: int, n_layer: int = 2, width: int = 32, heads: int = 4
) -> PretrainedConfig:
    """A GPT-2, LLaMA, GPT-NeoX (Pythia), OPT, Granite, Cohere or Falcon-H1 config of `n_layer` layers,
    `width` channels and `heads` attention heads (vLLM's CPU attention needs width / heads >= 32)."""
    if arch == "gpt_neox":  # Pythia's layout: parallel residual, rotary on a quarter of each head, no pad
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=n_layer,
            num_attention_heads=heads, rotary_pct=0.25, use_parallel_residual=True,
            max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=width, n_layer=n_layer, n_head=heads,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )  # fmt: skip
    # Granite and Cohere: LLaMA's layout with the logits divided by logits_scaling / times logit_scale.
    llama_like = {"llama": LlamaConfig, "granite": GraniteConfig, "cohere": CohereConfig}
    if arch in llama_like:
        return llama_like[arch](
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layer,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )  # fmt: skip
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=width, ffn_dim=4 * width, num_hidden_layers=n_layer,
            num_attention_heads=heads, max_position_embeddings=128, word_embed_proj_dim=width,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )  # fmt: skip
    if arch == "falcon_h1":  # attention and Mamba-2 mixers side by side; logits x lm_head_multiplier
        return FalconH1Config(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layer,
            num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4, mamba_d_ssm=width,
            mamba_n_heads=4, mamba_d_head=width // 4, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
            pad_token_id=eos_id,
        )  # fmt: skip
    allowed = "gpt2, llama, gpt_neox, opt, granite, cohere, falcon_h1"
    raise ValueError(f"unknown tiny arch {arch!r} (allowed: {allowed})")


def make_tiny_causal_lm(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    n_layer: int = 2,
    width: int = 32,
    heads: int = 4,
    seed: int = 0,
    vocab_size: int = 300,
    corpus: Sequence[str] = SENTENCES,
    tokenizer: str = "tiny",
    config_overrides: dict[str, object] | None = None,
) -> Path:
    """A random causal LM and its tokenizer (`tiny`: trained on `corpus`; `gpt2`: GPT-2's) saved as
    safetensors, its config changed by `config_overrides` (e.g. {"dropout": 0.3}); returns the dir."""
    out_dir = Path(out_dir)
    tok = _make_tokenizer(out_dir, tokenizer, vocab_size, corpus)
    torch.manual_seed(seed)
    config = tiny_config(arch, _model_vocab(tok, tokenizer), tok.eos_token_id, n_layer, width, heads)
    config.update(config_overrides or {})
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out_dir))
    return out_dir


def make_tiny_reward_model(
    out_dir: str | Path, arch: str = "gpt2", *, num_labels: int = 1, seed: int = 1, tokenizer: str = "tiny"
) -> Path:
    """A random sequence classifier with a `num_labels`-output score head, plus its tokenizer."""
    out_dir = Path(out_dir)
    tok = _make_tokenizer(out_dir, tokenizer, 300, SENTENCES)
    config = tiny_config(arch, _model_vocab(tok, tokenizer), tok.eos_token_id)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(out_dir))
    return out_dir
