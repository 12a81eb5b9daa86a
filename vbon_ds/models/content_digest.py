"""What a model checkpoint holds, as digests: recorded by the reference cache (its models) and by every
training checkpoint (its actor), so that weights overwritten in place are noticed instead of trusted by path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from vbon_ds.errors import VbonError

# Small files of a model: its architecture and its generation defaults (EOS ids).
MODEL_FILES = ("config.json", "generation_config.json")
# Every tokenizer file format.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
# Weight files in the loader's order of preference: safetensors when there are any, else PyTorch pickles.
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
HEAD_BYTES = 8 << 20  # safetensors' header and a GGUF's metadata (its tokenizer included) lie in the head
SAMPLES, SAMPLE_BYTES = 1024, 4096


class ModelNotDownloaded(VbonError):
    """A hub model is not in the local Hugging Face cache yet: its revision is known once it is loaded."""


def file_digest(path: Path) -> str:
    """`size:sha256` of a file's content; a file over HEAD_BYTES + SAMPLES * SAMPLE_BYTES is sampled.

    A sampled digest reads the first HEAD_BYTES and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets
    (the last block ends the file): about 12 MiB whatever the size, so fingerprinting a 14 GB checkpoint
    takes a fraction of a second where hashing it whole takes a minute at every job start. Training changes
    every value of a tensor it updates, so any updated tensor larger than size / SAMPLES (a layer's matrix,
    not just a norm's vector) changes a sampled block.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= HEAD_BYTES + SAMPLES * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            digest.update(os.pread(f.fileno(), HEAD_BYTES, 0))
            span = size - HEAD_BYTES - SAMPLE_BYTES
            for i in range(1, SAMPLES + 1):
                digest.update(os.pread(f.fileno(), SAMPLE_BYTES, HEAD_BYTES + span * i // SAMPLES))
    return f"{size}:{digest.hexdigest()}"


def _local_content(root: Path, gguf_file: str, weights: bool) -> dict[str, str]:
    """Digest of each file of a local checkpoint the answers depend on: its tokenizer files, the GGUF file
    when given (weights and tokenizer in one), and with `weights` the model's small files and weight files."""
    if root.is_file():  # a checkpoint given as one file
        return {root.name: file_digest(root)}
    names = [*TOKENIZER_FILES, *(MODEL_FILES if weights else ())]
    if gguf_file:
        names.append(gguf_file)
    elif weights:
        found = (sorted(p.name for p in root.glob(pattern)) for pattern in WEIGHT_GLOBS)
        names += next((files for files in found if files), [])
    return {name: file_digest(root / name) for name in names if (root / name).is_file()}


def checkpoint_content(path: str, gguf_file: str = "", weights: bool = True) -> dict[str, str]:
    """What identifies a checkpoint's content: file digests of a local directory (see `file_digest`), or
    the commit a hub id resolves to in the local Hugging Face cache. A git commit identifies every file's
    content, whichever of them were downloaded, and the lookup needs no network; a new commit on the hub
    (even one that only edits its README) therefore refuses the cache once it has been downloaded, erring
    on the safe side. ModelNotDownloaded for a hub id not downloaded yet."""
    if not path:
        return {}  # no model given: the loader says so
    local = Path(path).expanduser()
    if local.exists():
        return _local_content(local, gguf_file, weights)
    try:
        snapshot = Path(snapshot_download(path, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotDownloaded(
            f"model {path!r} is neither a local path nor in the local Hugging Face cache"
        ) from None
    except ValueError as err:  # not a valid hub id either
        raise VbonError(f"model path {path!r} does not exist and is not a hub id ({err})") from None
    return {"hub_commit": snapshot.name, **({"gguf_file": gguf_file} if gguf_file else {})}
