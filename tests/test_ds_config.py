"""Batch-size arithmetic and the filling of DeepSpeed JSON templates from the experiment config."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vbon_ds.batching import batch_sizes
from vbon_ds.config import ConfigError, load_config
from vbon_ds.engines import ds_config
from vbon_ds.engines.ds_config import CPU_REDUCE_BUCKET, ds_config_dir, fill_ds_config, load_ds_template

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = ("zero2.json", "zero3.json", "zero3_offload.json")


def test_batch_sizes_arithmetic():
    cfg = load_config(
        None,
        [
            "train.prompts_per_step=16",
            "algo.name=rloo",
            "algo.samples_per_prompt=4",
            "algo.num_minibatches=2",
            "train.micro_batch_size=4",
        ],
    )
    sizes = batch_sizes(cfg, world_size=2)
    assert sizes.rollout_samples == 64
    assert sizes.minibatch_samples == 32
    assert sizes.prompts_per_rank == 8
    # 32 answers per minibatch over 2 ranks = 16 each = 4 micro-batches of 4.
    assert sizes.gradient_accumulation_steps == 4


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["train.prompts_per_step=3"], 2, "train.prompts_per_step: 3 is not divisible by the world size 2"),
        (
            ["train.prompts_per_step=6", "algo.num_minibatches=4"],
            1,
            "algo.num_minibatches: 4 does not divide the 6",
        ),
        (
            ["train.prompts_per_step=6", "train.micro_batch_size=4"],
            1,
            "train.micro_batch_size: each rank gets 6/1 answers per minibatch",
        ),
    ],
)
def test_batch_sizes_errors_name_the_field(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        batch_sizes(load_config(None, overrides), world)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_templates_fill_completely_on_cpu(name):
    cfg = load_config(None, ["train.lr=2e-5", "train.max_grad_norm=0.5", "train.weight_decay=0.01"])
    ds = fill_ds_config(load_ds_template(name), cfg, batch_sizes(cfg, 2), on_gpu=False, hidden_size=64)
    assert "auto" not in json.dumps(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert params["lr"] == 2e-5 and params["weight_decay"] == 0.01 and params["betas"] == [0.9, 0.95]
    assert params["torch_adam"] is True  # no JIT-compiled CPU Adam on CPU
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == CPU_REDUCE_BUCKET  # not the GPU default 64^2


def test_gpu_uses_bf16_and_fused_adam_unless_lora():
    cfg = load_config()
    ds = fill_ds_config(load_ds_template("zero3"), cfg, batch_sizes(cfg, 1), on_gpu=True, bf16_supported=True)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["torch_adam"] is False
    lora = fill_ds_config(
        load_ds_template("zero3"), load_config(None, ["model.lora_rank=8"]), batch_sizes(cfg, 1), on_gpu=True
    )
    assert lora["optimizer"]["params"]["torch_adam"] is True  # no minute of JIT build for LoRA's few weights
    ds16 = fill_ds_config(
        load_ds_template("zero3"), cfg, batch_sizes(cfg, 1), on_gpu=True, bf16_supported=False
    )
    assert ds16["bf16"]["enabled"] is False and ds16["fp16"]["enabled"] is False  # fp32, not silent fp16
    forced = fill_ds_config(
        load_ds_template("zero3"),
        load_config(None, ["model.dtype=float16"]),
        batch_sizes(cfg, 1),
        on_gpu=True,
    )
    assert forced["fp16"]["enabled"] is True


def test_frozen_engine_config_has_no_optimizer_and_can_offload():
    cfg = load_config(None, ["deepspeed.reference_offload=true"])
    ds = fill_ds_config(
        load_ds_template("zero3_offload"), cfg, batch_sizes(cfg, 1), on_gpu=False, trainable=False
    )
    assert "optimizer" not in ds
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_explicit_values_in_the_json_are_kept(tmp_path):
    template = load_ds_template("zero3")
    template["gradient_clipping"] = 7.0
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    cfg = load_config(None, [f"deepspeed.config={path}"])
    ds = fill_ds_config(load_ds_template(cfg.deepspeed.config), cfg, batch_sizes(cfg, 1), on_gpu=False)
    assert ds["gradient_clipping"] == 7.0


def test_template_errors(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"deepspeed\.config: 'zero9' is neither a file nor a known config "
        r"\(zero2, zero3, zero3_offload\)",
    ):
        load_ds_template("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_ds_template(str(bad))
    template = {"train_micro_batch_size_per_gpu": "auto", "mystery": {"knob": "auto"}}
    cfg = load_config()
    with pytest.raises(ConfigError, match=r"no value to fill for mystery\.knob"):
        fill_ds_config(template, cfg, batch_sizes(cfg, 1), on_gpu=False)


def test_packaged_templates_hold_what_their_names_promise():
    templates = {p.stem: json.loads(p.read_text()) for p in ds_config_dir().glob("*.json")}
    assert sorted(templates) == ["zero2", "zero3", "zero3_offload"]
    stages = {name: t["zero_optimization"]["stage"] for name, t in templates.items()}
    assert stages == {"zero2": 2, "zero3": 3, "zero3_offload": 3}
    offload = templates["zero3_offload"]["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    for name in ("zero2", "zero3"):
        zero = templates[name]["zero_optimization"]
        assert "offload_optimizer" not in zero and "offload_param" not in zero, name
    for name, template in templates.items():
        # The experiment config owns batch sizes, learning rate and precision: the JSON leaves them "auto".
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            assert template[key] == "auto", (name, key)
        assert template["optimizer"]["params"]["lr"] == "auto", name
        assert template["bf16"]["enabled"] == "auto", name


def test_the_top_level_ds_configs_is_the_one_source_of_the_templates():
    assert ds_config_dir() == REPO / "ds_configs"
    assert sorted(p.name for p in ds_config_dir().glob("*.json")) == list(TEMPLATES)
    assert not [p for name in TEMPLATES for p in (REPO / "vbon_ds").rglob(name)], "a second copy"


def load_zero3_from(python_path: Path) -> dict:
    """load_ds_template("zero3") in a fresh process that imports vbon_ds from `python_path`."""
    code = "import json, vbon_ds.engines.ds_config as d; print(json.dumps(d.load_ds_template('zero3')))"
    result = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": str(python_path)}, cwd=python_path.parent,
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return json.loads(result.stdout)


def tracked_copy(dest: Path) -> Path:
    """The repository's tracked files (a clean clone's content) copied to dest."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in names.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_editing_the_top_level_template_changes_what_vbon_runs(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "vbon_ds", checkout / "vbon_ds")
    shutil.copytree(REPO / "ds_configs", checkout / "ds_configs")
    edited = json.loads((checkout / "ds_configs" / "zero3.json").read_text())
    edited["zero_optimization"]["stage3_max_live_parameters"] = 123_456
    (checkout / "ds_configs" / "zero3.json").write_text(json.dumps(edited))
    assert load_zero3_from(checkout) == edited


@pytest.mark.slow
def test_an_installed_wheel_carries_and_finds_the_templates(tmp_path):
    source = tracked_copy(tmp_path / "source")
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels]
    subprocess.run([*build, source], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("vbon_ds-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        packaged = sorted(n for n in archive.namelist() if n.endswith(".json") and "ds_configs" in n)
        assert packaged == [f"vbon_ds/ds_configs/{name}" for name in TEMPLATES]
        archive.extractall(installed)
    for name in TEMPLATES:
        assert (installed / "vbon_ds" / "ds_configs" / name).read_bytes() == (
            REPO / "ds_configs" / name
        ).read_bytes()
    # No source checkout around it: the installed copy is the one read.
    assert load_zero3_from(installed) == json.loads((REPO / "ds_configs" / "zero3.json").read_text())


@pytest.mark.parametrize("name", ["zero2", "zero3"])
@pytest.mark.parametrize("trainable", [True, False])
def test_world_of_one_runs_stage_0_and_says_so(name, trainable, caplog):
    ds_config._say_once.cache_clear()
    cfg = load_config()
    ds = fill_ds_config(
        load_ds_template(name), cfg, batch_sizes(cfg, 1), on_gpu=False, hidden_size=64, trainable=trainable
    )
    assert ds["zero_optimization"] == {"stage": 0}
    assert ("optimizer" in ds) == trainable and ds["train_batch_size"] == 16
    stage = load_ds_template(name)["zero_optimization"]["stage"]
    assert f"world of one: ZeRO stage {stage} -> 0 (nothing to partition)" in caplog.messages


@pytest.mark.parametrize(
    "name, world, overrides",
    [
        ("zero3", 2, []),  # several ranks: partitioning is the point
        ("zero3", 1, ["deepspeed.force_stage=true"]),  # debugging ZeRO-3 in one process
        ("zero2", 1, ["deepspeed.force_stage=true"]),
        ("zero3_offload", 1, []),  # alone, but parameters and optimizer states live on CPU
    ],
)
def test_configured_stage_is_kept(name, world, overrides):
    cfg = load_config(None, ["train.prompts_per_step=8", *overrides])
    template = load_ds_template(name)
    ds = fill_ds_config(template, cfg, batch_sizes(cfg, world), on_gpu=False, hidden_size=64)
    assert ds["zero_optimization"]["stage"] == template["zero_optimization"]["stage"]
    assert ds["zero_optimization"]["reduce_bucket_size"] == CPU_REDUCE_BUCKET  # not the GPU default 64^2


def test_frozen_models_alone_keep_zero3_when_offloaded():
    cfg = load_config(None, ["deepspeed.reference_offload=true"])
    ds = fill_ds_config(load_ds_template("zero3"), cfg, batch_sizes(cfg, 1), on_gpu=False, trainable=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_reduce_bucket_is_hidden_squared_on_gpu_and_large_on_cpu():
    cfg = load_config(None, ["train.prompts_per_step=8"])
    sizes = batch_sizes(cfg, 2)
    for on_gpu, hidden, want in ((True, 64, 64 * 64), (False, 64, CPU_REDUCE_BUCKET), (False, 10_000, 10**8)):
        ds = fill_ds_config(load_ds_template("zero3"), cfg, sizes, on_gpu=on_gpu, hidden_size=hidden)
        assert ds["zero_optimization"]["reduce_bucket_size"] == want
