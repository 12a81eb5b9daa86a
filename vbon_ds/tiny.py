"""Tiny random models and a tiny tokenizer saved to a directory, loadable by path exactly like a hub id.

The `tiny` demo preset and the tests use them: a few KB each, built in well under a second, no network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
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


def tiny_config(
    arch: str, vocab_size: int, eos_id: int, n_layer: int = 2, width: int = 32
) -> PretrainedConfig:
    """A GPT-2 or LLaMA config of `n_layer` layers and `width` channels."""
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=128, n_embd=width, n_layer=n_layer, n_head=4,
            bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )  # fmt: skip
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layer,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        )  # fmt: skip
    raise ValueError(f"unknown tiny arch {arch!r} (allowed: gpt2, llama)")


def make_tiny_causal_lm(
    out_dir: str | Path,
    arch: str = "gpt2",
    *,
    n_layer: int = 2,
    width: int = 32,
    seed: int = 0,
    vocab_size: int = 300,
    corpus: Sequence[str] = SENTENCES,
) -> Path:
    """A random causal LM and its tokenizer (trained on `corpus`) saved as safetensors; returns the dir."""
    out_dir = Path(out_dir)
    tok = make_tiny_tokenizer(out_dir, vocab_size, corpus)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok), tok.eos_token_id, n_layer, width))
    model.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_reward_model(
    out_dir: str | Path, arch: str = "gpt2", *, num_labels: int = 1, seed: int = 1
) -> Path:
    """A random sequence classifier with a `num_labels`-output score head, plus its tokenizer."""
    out_dir = Path(out_dir)
    tok = make_tiny_tokenizer(out_dir)
    config = tiny_config(arch, len(tok), tok.eos_token_id)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(out_dir))
    return out_dir
