"""Layer 2: log-probs of chosen tokens without materialising a second [tokens, vocab] tensor.

`token_logprobs` works from logits, `linear_token_logprobs` from hidden states and the lm-head weight.
Both run on Triton kernels on CUDA and on a chunked torch path everywhere else (see `dispatch`); triton is
imported only when its backend is actually used, so importing this package is cheap and works without it.
"""

from vbon_ds.kernels.dispatch import BACKENDS, ENV_VAR, get_backend, set_backend
from vbon_ds.kernels.linear import linear_token_logprobs
from vbon_ds.kernels.logprobs import IGNORE_INDEX, token_logprobs

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "IGNORE_INDEX",
    "get_backend",
    "linear_token_logprobs",
    "set_backend",
    "token_logprobs",
]
