"""Token log-prob benchmark: naive log_softmax+gather, a row loop and vbon_ds.kernels; time and peak memory.

Every (case, method, mode) runs in a fresh process so that peak memory is its own: on CPU the ru_maxrss rise
over the inputs, on CUDA max_memory_allocated over the inputs. A process times the median of --repeats runs
after a first run (which sets the peak); the methods' processes alternate for --rounds rounds and the table
keeps each method's fastest round and largest peak, so that load from other users of a shared machine
distorts the comparison less. Modes: `fwd` under no_grad (the reference model), `fwd+bwd` (the actor).

    python benchmarks/logprobs.py                 # the cases for this machine (CPU or CUDA)
    python benchmarks/logprobs.py --quick         # tiny smoke run
    python benchmarks/logprobs.py --cases token --methods naive,ours --repeats 5
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vbon_ds.kernels import linear_token_logprobs, token_logprobs


@dataclass(frozen=True)
class Case:
    batch: int  # rows of the [batch, seq] token grid; the row loop iterates over these
    seq: int
    vocab: int
    hidden: int = 0  # > 0: a linear case, logits = hidden @ weight.T
    dtype: str = "float32"


CPU_CASES = {
    "token": Case(8, 512, 50304),
    "linear": Case(8, 512, 49152, hidden=576),
}
CUDA_CASES = {
    "token-bf16-50k": Case(16, 1024, 50304, dtype="bfloat16"),
    "token-bf16-152k": Case(16, 1024, 151936, dtype="bfloat16"),
    "linear-bf16-152k": Case(16, 1024, 151936, hidden=3584, dtype="bfloat16"),
}
QUICK_CASES = {
    "token": Case(4, 64, 5003),
    "linear": Case(4, 64, 4099, hidden=64),
}


# ---- methods: (logits or (hidden, weight), labels) -> log-probs [batch, seq] ----


def naive(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def row_loop(logits, labels):
    """TRL's selective_log_softmax (trl/trainer/utils.py); OpenRLHF's log_probs_from_logits does the same."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, labels[..., None]).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = [
        F.log_softmax(row, dim=-1).gather(-1, lab[:, None]).squeeze(-1)
        for row, lab in zip(logits, labels, strict=True)
    ]
    return torch.stack(rows)


def liger(logits, labels):
    from liger_kernel.transformers.functional import liger_cross_entropy

    flat = liger_cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return -flat.view(labels.shape)


def flash_attn(logits, labels):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(logits.flatten(0, 1), labels.flatten())
    return -losses.view(labels.shape)


TOKEN_METHODS = {
    "naive": naive,
    "row-loop": row_loop,
    "ours": token_logprobs,
    "liger": liger,
    "flash-attn": flash_attn,
}
LINEAR_METHODS = {
    "naive-linear": lambda hidden, weight, labels: naive(hidden @ weight.T, labels),
    "ours-linear": linear_token_logprobs,
}
CUDA_ONLY = {"liger": "liger_kernel", "flash-attn": "flash_attn"}


def methods_for(case: Case, device: str) -> list[str]:
    """All methods that apply, the baseline (naive) first."""
    if case.hidden:
        return list(LINEAR_METHODS)
    return [
        m
        for m in TOKEN_METHODS
        if m not in CUDA_ONLY or (device == "cuda" and importlib.util.find_spec(CUDA_ONLY[m]) is not None)
    ]


# ---- one measurement, in a child process ----


def make_inputs(case: Case, device: str, grad: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inputs built in place (no temporaries that would raise the peak before the baseline is taken)."""
    gen = torch.Generator(device).manual_seed(0)
    dtype = getattr(torch, case.dtype)
    labels = torch.randint(0, case.vocab, (case.batch, case.seq), generator=gen, device=device)
    if case.hidden:
        hidden = torch.randn(case.batch, case.seq, case.hidden, generator=gen, device=device, dtype=dtype)
        weight = torch.randn(case.vocab, case.hidden, generator=gen, device=device, dtype=dtype)
        tensors = [hidden, weight.mul_(case.hidden**-0.5)]
    else:
        logits = torch.randn(case.batch, case.seq, case.vocab, generator=gen, device=device, dtype=dtype)
        tensors = [logits.mul_(3.0)]
    return [t.requires_grad_(grad) for t in tensors], labels


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(case: Case, method: str, mode: str, repeats: int, device: str) -> dict:
    fn = (LINEAR_METHODS if case.hidden else TOKEN_METHODS)[method]
    grad = mode == "fwd+bwd"

    def run(tensors, labels):
        if not grad:
            with torch.no_grad():
                fn(*tensors, labels)
            return
        upstream = torch.ones(labels.shape, device=device)
        (fn(*tensors, labels) * upstream).sum().backward()
        for t in tensors:
            t.grad = None

    run(*make_inputs(Case(2, 8, 97, min(case.hidden, 8), case.dtype), device, grad))  # warm up lazy inits
    tensors, labels = make_inputs(case, device, grad)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_bytes(device)
    run(tensors, labels)
    sync(device)
    extra = peak_bytes(device) - baseline
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(tensors, labels)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "extra_bytes": extra}


def copy_bandwidth() -> float:
    """The card's device-to-device copy bandwidth in GB/s (read + write), measured on 1 GiB."""
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - start) / 1e9


# ---- the parent: spawn, collect, print ----


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, torch {torch.__version__}"


def spawn(case: Case, method: str, mode: str, repeats: int, device: str) -> dict:
    job = json.dumps(
        {"case": asdict(case), "method": method, "mode": mode, "repeats": repeats, "device": device}
    )
    proc = subprocess.run([sys.executable, __file__, "--child", job], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:80]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(results: list[dict]) -> dict:
    """The fastest round's time and the largest round's peak; an error if every round failed."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    return {"seconds": min(r["seconds"] for r in ok), "extra_bytes": max(r["extra_bytes"] for r in ok)}


def row(name, case, method, mode, result, base, bandwidth) -> str:
    if "error" in result:
        return f"| {name} | {method} | {mode} | failed: {result['error']} | | | | |"
    seconds, extra = result["seconds"], result["extra_bytes"]
    cells = [name, method, mode, f"{seconds * 1e3:.1f}", f"{extra / 2**20:.0f}"]
    if "error" in base:
        cells += ["", ""]
    else:
        cells += [f"{seconds / base['seconds']:.2f}x", f"{extra / max(base['extra_bytes'], 1):.2f}x"]
    if bandwidth and mode == "fwd" and not case.hidden:  # bytes of logits read once per forward
        rate = case.batch * case.seq * case.vocab * getattr(torch, case.dtype).itemsize / seconds / 1e9
        cells.append(f"{rate:.0f} GB/s ({rate / bandwidth:.0%})")
    else:
        cells.append("")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", help="comma-separated case names (default: all for this device)")
    parser.add_argument("--methods", help="comma-separated methods (default: all that apply)")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process (median)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per method, alternating (fastest)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 repeat: a smoke run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(**{**job, "case": Case(**job["case"])})))
        return

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = QUICK_CASES if args.quick else CUDA_CASES if device == "cuda" else CPU_CASES
    names = args.cases.split(",") if args.cases else list(cases)
    unknown = set(names) - set(cases)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {sorted(cases)}")
    if args.quick:
        args.repeats = args.rounds = 1
    bandwidth = copy_bandwidth() if device == "cuda" else 0.0
    print(
        f"{datetime.date.today()}, {machine()}"
        + (f", copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else "")
    )
    print(
        f"median of {args.repeats} runs, fastest of {args.rounds} rounds; extra peak ="
        f" {'max_memory_allocated' if bandwidth else 'ru_maxrss'} rise over the inputs, largest of the rounds"
    )
    print("\n| case | method | mode | ms | extra peak MiB | time / naive | memory / naive | forward rate |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        case = cases[name]
        methods = args.methods.split(",") if args.methods else methods_for(case, device)
        for mode in args.modes.split(","):
            rounds = [
                {m: spawn(case, m, mode, args.repeats, device) for m in methods} for _ in range(args.rounds)
            ]
            results = {m: best_of([r[m] for r in rounds]) for m in methods}
            base = results[methods[0]]  # ratios are to the first method: naive unless --methods says else
            for method in methods:
                print(row(name, case, method, mode, results[method], base, bandwidth), flush=True)


if __name__ == "__main__":
    main()
