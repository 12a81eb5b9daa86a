"""Log-prob kernels against float64 references: values, entropy, gradients, layouts, memory contract.

Kernel tests run on the torch backend, and on the Triton backend wherever it can run: on CUDA, or on CPU when
TRITON_INTERPRET=1 was set before triton was imported (tests/conftest.py does so where there is no GPU).
"""

import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vbon_ds.engines.lm_head import final_hidden_states, gathered_lm_head
from vbon_ds.kernels import IGNORE_INDEX, dispatch, linear_token_logprobs, set_backend, token_logprobs

REPO = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
TRITON_RUNS = importlib.util.find_spec("triton") is not None and (DEVICE.type == "cuda" or INTERPRETED)


NO_TRITON = pytest.mark.skipif(not TRITON_RUNS, reason="no CUDA, no TRITON_INTERPRET")


@pytest.fixture(params=["torch", pytest.param("triton", marks=NO_TRITON)])
def backend(request):
    set_backend(request.param)
    yield request.param
    set_backend("auto")


def randn(*shape, gen, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def random_labels(shape, vocab, gen):
    """Labels in [0, vocab) with about a fifth of them IGNORE_INDEX."""
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.2] = IGNORE_INDEX
    return labels.to(DEVICE)


def make_logits(shape, vocab, dtype, layout, gen, scale=3.0):
    """A leaf [*shape, vocab] laid out `contiguous`, `sliced` like a causal LM's logits[:, :-1] (leading dims
    not viewable as one) or `transposed` (vocab stride != 1). Cast before slicing: .to() copies contiguous.
    """
    if layout == "sliced":
        x = randn(*shape[:-1], shape[-1] + 1, vocab, gen=gen, scale=scale, dtype=dtype)[..., :-1, :]
    elif layout == "transposed":
        x = randn(vocab, *shape, gen=gen, scale=scale, dtype=dtype).movedim(0, -1)
    else:
        x = randn(*shape, vocab, gen=gen, scale=scale, dtype=dtype)
    return x.to(DEVICE).detach().requires_grad_()


def reference(logits, labels, temperature):
    """float64 log-probs and entropy of softmax(logits / T), 0 where labels are ignored."""
    lsm = (logits.double() / temperature).log_softmax(-1)
    keep = labels != IGNORE_INDEX
    logp = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp * keep, -(lsm.exp() * lsm).sum(-1) * keep


def reference_grads(inputs, upstream, fn):
    """Gradients of sum(fn(*float64 copies) * upstream) w.r.t. each input, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad((fn(*leaves)[0] * upstream).sum(), leaves)


# Gradients come back in the input dtype, so they carry its rounding.
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-6, rtol=1e-2),
}

TOKEN_CASES = {
    # shape, vocab, dtype, temperature, layout, chunk_bytes (None: default; else a few rows per chunk)
    "plain": ((16,), 257, torch.float32, 1.0, "contiguous", None),
    "sliced-chunked": ((4, 6), 1000, torch.float32, 0.7, "sliced", 4 * 1000 * 5),
    "transposed-2blocks": ((3, 5), 4099, torch.float32, 2.5, "transposed", None),
    "vocab1": ((7,), 1, torch.float32, 1.0, "contiguous", None),
    "bf16-sliced": ((4, 6), 311, torch.bfloat16, 1.0, "sliced", None),
    "fp16-chunked": ((4, 6), 311, torch.float16, 0.5, "contiguous", 4 * 311 * 7),
}


@pytest.mark.parametrize("case", TOKEN_CASES.values(), ids=TOKEN_CASES.keys())
def test_token_logprobs_match_float64(backend, case):
    shape, vocab, dtype, temperature, layout, chunk_bytes = case
    gen = torch.Generator().manual_seed(len(shape) * vocab)
    logits = make_logits(shape, vocab, dtype, layout, gen)
    labels = random_labels(shape, vocab, gen)
    upstream = randn(*shape, gen=gen, dtype=torch.float64).to(DEVICE)

    logp, entropy = token_logprobs(logits, labels, temperature, return_entropy=True, chunk_bytes=chunk_bytes)
    (logp * upstream).sum().backward()

    ref_logp, ref_entropy = reference(logits, labels, temperature)
    assert logp.dtype == entropy.dtype == torch.float32 and logp.shape == labels.shape
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-5, rtol=1e-5)
    assert logits.grad.dtype == dtype
    (ref_grad,) = reference_grads([logits], upstream, lambda x: reference(x, labels, temperature))
    torch.testing.assert_close(logits.grad.double(), ref_grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_extreme_logits_stay_accurate(backend, temperature):
    gen = torch.Generator().manual_seed(1)
    x = randn(6, 515, gen=gen, scale=1e4)
    x[0] = 1e4  # uniform at the top of the range
    x[1] = -1e4
    x[1, 7] = 1e4  # one-hot
    logits = x.to(DEVICE).requires_grad_()
    labels = torch.tensor([3, 7, 8, IGNORE_INDEX, 0, 514], device=DEVICE)
    labels[2] = x[2].argmax()
    upstream = randn(6, gen=gen, dtype=torch.float64).to(DEVICE)

    logp, entropy = token_logprobs(logits, labels, temperature, return_entropy=True)
    (logp * upstream).sum().backward()

    # The float32 tempered logits are only resolved to a few ulps of their magnitude (2e-3 at 3e4).
    atol = 4 * torch.finfo(torch.float32).eps * 1e4 / temperature
    ref_logp, ref_entropy = reference(logits, labels, temperature)
    torch.testing.assert_close(logp.double(), ref_logp, atol=atol, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=1e-6)
    (ref_grad,) = reference_grads([logits], upstream, lambda x: reference(x, labels, temperature))
    grad_atol = atol * upstream.abs().max().item() / temperature  # d softmax = softmax * d exponent
    torch.testing.assert_close(logits.grad.double(), ref_grad, atol=grad_atol, rtol=1e-5)


LINEAR_CASES = {
    # leading shape, hidden size, vocab, dtype, temperature, chunk_bytes
    "fp32-chunked": ((2, 7), 24, 301, torch.float32, 0.8, 4 * 301 * 4),
    "bf16": ((13,), 16, 1031, torch.bfloat16, 1.0, None),
}


@pytest.mark.parametrize("case", LINEAR_CASES.values(), ids=LINEAR_CASES.keys())
def test_linear_token_logprobs_match_float64(backend, case):
    shape, hidden_size, vocab, dtype, temperature, chunk_bytes = case
    gen = torch.Generator().manual_seed(hidden_size * vocab)
    hidden = randn(*shape, hidden_size, gen=gen, dtype=dtype).to(DEVICE).requires_grad_()
    weight = randn(vocab, hidden_size, gen=gen, scale=0.5, dtype=dtype).to(DEVICE).requires_grad_()
    labels = random_labels(shape, vocab, gen)
    upstream = randn(*shape, gen=gen, dtype=torch.float64).to(DEVICE)

    logp, entropy = linear_token_logprobs(
        hidden, weight, labels, temperature, return_entropy=True, chunk_bytes=chunk_bytes
    )
    (logp * upstream).sum().backward()

    def ref(h, w):
        return reference(h @ w.T, labels, temperature)

    ref_logp, ref_entropy = ref(hidden.double(), weight.double())
    ref_grads = reference_grads([hidden, weight], upstream, ref)
    if dtype == torch.float32:
        value_tol, grad_tol = dict(atol=2e-5, rtol=1e-5), GRAD_TOL[dtype]
    else:  # the logits themselves are bf16, as the model's own lm head would make them
        logits_ulp = 2 * torch.finfo(dtype).eps * (hidden.double() @ weight.double().T).abs().max().item()
        value_tol, grad_tol = dict(atol=logits_ulp, rtol=0.0), dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(logp.double(), ref_logp, **value_tol)
    torch.testing.assert_close(entropy.double(), ref_entropy, **value_tol)
    for ours, expected in zip([hidden.grad, weight.grad], ref_grads, strict=True):
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.double(), expected, **grad_tol)


def test_linear_gradient_for_one_input_only(backend):
    gen = torch.Generator().manual_seed(2)
    hidden, weight = randn(9, 8, gen=gen).to(DEVICE), randn(50, 8, gen=gen).to(DEVICE).requires_grad_()
    labels = random_labels((9,), 50, gen)
    linear_token_logprobs(hidden, weight, labels).sum().backward()
    (ref_grad,) = reference_grads([weight], 1.0, lambda w: reference(hidden.double() @ w.T, labels, 1.0))
    torch.testing.assert_close(weight.grad.double(), ref_grad, **GRAD_TOL[torch.float32])


def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(3)
    labels = torch.tensor([[1, IGNORE_INDEX], [10, 0]], device=DEVICE)
    logits = randn(2, 2, 11, gen=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, 0.8), (logits,))
    hidden = randn(2, 2, 3, gen=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    weight = randn(11, 3, gen=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: linear_token_logprobs(h, w, labels, 1.3, chunk_bytes=4 * 11), (hidden, weight)
    )


def test_labels_out_of_range_give_nan_and_ignored_give_zero(backend):
    logits = torch.randn(4, 20, device=DEVICE, requires_grad=True)
    labels = torch.tensor([3, 20, -5, IGNORE_INDEX], device=DEVICE)
    logp, entropy = token_logprobs(logits, labels, return_entropy=True)
    assert logp[0].isfinite() and logp[1:3].isnan().all() and logp[3] == 0 and entropy[3] == 0
    logp[[0, 3]].sum().backward()
    assert logits.grad[3].eq(0).all() and logits.grad[0].ne(0).all()


def test_no_grad_gives_the_same_values_and_saves_nothing(backend):
    logits = torch.randn(5, 33, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 33, (5,), device=DEVICE)
    with torch.no_grad():
        frozen = token_logprobs(logits, labels)
    logp, entropy = token_logprobs(logits, labels, return_entropy=True)
    assert frozen.grad_fn is None and not entropy.requires_grad
    torch.testing.assert_close(frozen, logp.detach(), atol=0, rtol=0)


def test_backward_saves_nothing_of_size_tokens_x_vocab(backend):
    tokens, hidden_size, vocab = 64, 8, 500
    logits = torch.randn(tokens, vocab, device=DEVICE, requires_grad=True)
    hidden = torch.randn(tokens, hidden_size, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, labels, return_entropy=True)
        linear_token_logprobs(hidden, weight, labels)
    big = [t.shape for t in saved if t.numel() >= tokens * vocab and t.data_ptr() != logits.data_ptr()]
    assert not big


class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any torch op produces while active."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def test_linear_path_never_holds_the_full_logits():
    """On the torch path: the Triton interpreter stages byte copies of its arguments. Chunking is shared."""
    tokens, hidden_size, vocab, rows = 96, 8, 500, 8
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    with LargestOutput() as mode:  # on CPU, so that backward runs on this thread and is recorded too
        linear_token_logprobs(hidden, weight, labels, chunk_bytes=4 * vocab * rows).sum().backward()
    assert mode.numel <= rows * vocab < tokens * vocab


def test_bad_arguments_are_rejected():
    logits, labels = torch.randn(3, 10), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels shape"):
        token_logprobs(logits, labels[:2])
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="weight shape"):
        linear_token_logprobs(torch.randn(3, 4), torch.randn(10, 5), labels)


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="auto, torch, triton"):
        set_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{dispatch.ENV_VAR}.*auto, torch, triton"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.backend_for(cpu).__name__.endswith("torch_rows")  # auto on CPU
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.backend_for(cpu)
    try:
        set_backend("torch")  # the config's choice wins over the env var
        assert dispatch.get_backend() == "torch"
        assert dispatch.backend_for(cpu).__name__.endswith("torch_rows")
    finally:
        set_backend("auto")
    assert dispatch.get_backend() == "triton"


def test_importing_kernels_does_not_import_triton():
    code = "import sys, vbon_ds.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


# ---- the lm head: HF hidden states feed the fused path; ZeRO-3 gathering ----


def tiny_causal_lm(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {
        "gpt2": dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0),
        "gpt_neox": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
        "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    }
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=301, **sizes[arch])).eval()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_final_hidden_states_times_lm_head_give_the_models_logprobs(arch):
    model = tiny_causal_lm(arch)
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(4))
    labels = ids[:, 1:]
    out = model(ids, output_hidden_states=True)
    hidden = final_hidden_states(model, ids)
    torch.testing.assert_close(hidden, out.hidden_states[-1])

    with gathered_lm_head(model) as weight:
        assert weight is model.get_output_embeddings().weight
        fused = linear_token_logprobs(hidden[:, :-1], weight, labels, 0.9)
    expected = token_logprobs(out.logits[:, :-1], labels, 0.9)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    fused_grads = torch.autograd.grad(fused.sum(), list(model.parameters()), allow_unused=True)
    expected_grads = torch.autograd.grad(expected.sum(), list(model.parameters()), allow_unused=True)
    for ours, theirs in zip(fused_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_gathered_lm_head_refuses_a_head_with_bias():
    class BiasedHead(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Linear(4, 10)

    with pytest.raises(ValueError, match="bias"), gathered_lm_head(BiasedHead()):
        pass


ZERO3_SCRIPT = textwrap.dedent(
    """
    import deepspeed, torch
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.integrations import HfDeepSpeedConfig
    from vbon_ds.engines import distributed
    from vbon_ds.engines.lm_head import final_hidden_states, gathered_lm_head
    from vbon_ds.kernels import linear_token_logprobs, token_logprobs

    distributed.init_distributed()  # gloo on CPU, without DeepSpeed's shared-memory all-reduce
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                 "zero_allow_untested_optimizer": True}
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_config build the model partitioned
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=301, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = AutoModelForCausalLM.from_config(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                      config=ds_config)
    head = engine.module.get_output_embeddings().weight
    assert head.numel() == 0, "not partitioned"
    ids = torch.randint(0, 301, (2, 9))
    labels = ids[:, 1:]

    def lm_head_grad(loss):
        engine.optimizer.zero_grad()
        engine.backward(loss)
        return deepspeed.utils.safe_get_full_grad(head).clone()

    hidden = final_hidden_states(engine.module, ids)[:, :-1]  # before gathering: the embedding is tied
    with gathered_lm_head(engine.module) as weight:
        assert weight.shape == (301, 32)
        fused = linear_token_logprobs(hidden, weight, labels)
        fused_grad = lm_head_grad(fused.sum())
    assert head.numel() == 0, "not re-partitioned"
    expected = token_logprobs(engine(ids).logits[:, :-1], labels)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad, lm_head_grad(expected.sum()), atol=1e-5, rtol=1e-4)

    hidden = final_hidden_states(engine.module, ids)[:, :-1]
    with gathered_lm_head(engine.module) as weight:
        fused = linear_token_logprobs(hidden, weight, labels)
    try:
        engine.backward(fused.sum())
    except RuntimeError as err:
        assert "inside `gathered_lm_head`" in str(err), err
    else:
        raise AssertionError("backward after the block should fail: the weight is partitioned again")
    print("ZERO3 OK")
    """
)


@pytest.mark.slow
def test_gathered_lm_head_under_zero3():
    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env = {**os.environ, **dist_env, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", ZERO3_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert "ZERO3 OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
