"""Config: defaults, YAML round trip, --set overrides with type conversion, and every validation message."""

import dataclasses

import pytest
import yaml

from vbon_ds.config import (
    ConfigError,
    ExperimentConfig,
    config_reference,
    dump_config,
    load_config,
)
from vbon_ds.config_parsing import field_docs


def write_yaml(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_without_file_or_from_an_empty_one(tmp_path):
    assert load_config() == ExperimentConfig()
    assert load_config(write_yaml(tmp_path, "# nothing set\n")) == ExperimentConfig()


def test_yaml_values_are_converted_to_field_types(tmp_path):
    # PyYAML reads 3e-6 as a string (YAML 1.1): the loader must still give a float.
    path = write_yaml(tmp_path, "train:\n  lr: 3e-6\n  steps: 7\nvbon:\n  n: 16\n  objective: vbon_exact\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(3e-6) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.vbon.n == 16 and cfg.vbon.objective == "vbon_exact"


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(
        None,
        [
            "model.actor=some/model",
            "train.lr=1e-5",
            "reward.missing_eos_score=-1",
            "train.adam_betas=0.8,0.9",
        ],
    )
    again = load_config(write_yaml(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, section, key, expected",
    [
        ("train.lr=1e-5", "train", "lr", 1e-5),
        ("train.steps=12", "train", "steps", 12),
        ("model.gradient_checkpointing=true", "model", "gradient_checkpointing", True),
        ("logging.tensorboard=off", "logging", "tensorboard", False),
        ("model.actor=EleutherAI/pythia-160m", "model", "actor", "EleutherAI/pythia-160m"),
        ("model.actor=123", "model", "actor", "123"),
        ("algo.ipo_beta=0.05", "algo", "ipo_beta", 0.05),  # float or null, as vbon.beta (kl_rl only)
        ("reward.missing_eos_score=null", "reward", "missing_eos_score", None),
        ("reward.missing_eos_score=-2.5", "reward", "missing_eos_score", -2.5),
        ("generation.eval_temperatures=[0.5, 1.0]", "generation", "eval_temperatures", [0.5, 1.0]),
        ("generation.eval_temperatures=0.25,1", "generation", "eval_temperatures", [0.25, 1.0]),
        ("train.output_dir=/tmp/a=b", "train", "output_dir", "/tmp/a=b"),
    ],
)
def test_set_overrides_convert_types(override, section, key, expected):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, section), key) == expected


def test_overrides_apply_after_the_file(tmp_path):
    path = write_yaml(tmp_path, {"train": {"lr": 1e-4, "steps": 5}})
    cfg = load_config(path, ["train.lr=2e-4"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["vbon.n=1"], "vbon.n: 1 is out of range (allowed: [2, inf])"),
        (["train.lr=0"], "train.lr: 0.0 is out of range (allowed: (0.0, inf])"),
        (["train.lr=-1e-5"], "train.lr: -1e-05 is out of range (allowed: (0.0, inf])"),
        (["train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["train.lr=nan"], "train.lr: nan is not a finite number"),
        (["generation.temperature=0"], "generation.temperature: 0.0 is out of range (allowed: (0.0, inf])"),
        (["generation.top_p=1.5"], "generation.top_p: 1.5 is out of range (allowed: (0.0, 1.0])"),
        (["algo.gamma=2"], "algo.gamma: 2.0 is out of range (allowed: [0.0, 1.0])"),
        (["train.steps=2.5"], "train.steps: expected int, got '2.5'"),
        (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing: expected bool, got 'maybe'"),
        (
            ["algo.name=sac"],
            "algo.name: 'sac' is not allowed (allowed: ppo, rloo, bon_sft, dpo, ipo, bonbon)",
        ),
        (["vbon.objective=bond"], "vbon.objective: 'bond' is not allowed (allowed: vbon, vbon_exact, kl_rl)"),
        (
            ["model.dtype=fp8"],
            "model.dtype: 'fp8' is not allowed (allowed: auto, float32, bfloat16, float16)",
        ),
        (["train.lrr=1e-5"], "train.lrr: unknown key; did you mean 'lr'?"),
        (["trian.lr=1e-5"], "trian: unknown key; did you mean 'train'?"),
        (["model.zzz=1"], "model.zzz: unknown key (known keys: actor, reference,"),
        (["train=3"], "train: expected a mapping of TrainConfig fields, got '3'"),
        (["train.lr"], "--set 'train.lr': expected KEY=VALUE"),
        (["vbon.objective=kl_rl"], "vbon.beta: the kl_rl objective needs an explicit KL coefficient"),
        (["algo.name=rloo"], "algo.samples_per_prompt: RLOO needs at least 2 samples per prompt, got 1"),
        (["train.adam_betas=0.9"], "train.adam_betas: expected two numbers in [0, 1), got [0.9]"),
        (
            ["generation.eval_temperatures=[0.7, 0]"],
            "generation.eval_temperatures: expected positive temperatures",
        ),
        (
            ["train.resume=/no/such/ckpt"],
            "train.resume: '/no/such/ckpt' is neither auto, none nor an existing",
        ),
    ],
)
def test_validation_messages_name_field_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override, use",
    [
        ("generation.top_p=0.9", "use 1.0"),
        ("generation.top_k=50", "use 0"),
        ("generation.min_new_tokens=5", "use 0"),
    ],
)
def test_truncated_sampling_is_refused(override, use):
    """The recorder, the training forwards, evaluation's KL and the cache's BoN bound all use log-probs of
    the full softmax(logits / T): sampling from a truncated or EOS-masked one would make them wrong."""
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{field}: ") and "not sampled" in message and use in message
    assert "\n" not in message


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_biased_kl_estimators_are_refused(estimator):
    with pytest.raises(ConfigError, match=rf"^algo.kl_estimator: '{estimator}' .*; use k1$"):
        load_config(None, [f"algo.kl_estimator={estimator}"])
    assert load_config(None, ["algo.kl_estimator=k1"]).algo.kl_estimator == "k1"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write_yaml(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections at the top level"):
        load_config(write_yaml(tmp_path, "- a\n- b\n"))
    with pytest.raises(
        ConfigError, match=r"model\.trust_remote_cod: unknown key; did you mean 'trust_remote_code'"
    ):
        load_config(write_yaml(tmp_path, {"model": {"trust_remote_cod": True}}))


def test_every_field_has_a_one_line_docstring():
    sections = [
        ExperimentConfig,
        *(type(getattr(ExperimentConfig(), f.name)) for f in dataclasses.fields(ExperimentConfig)),
    ]
    for cls in sections:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            assert docs[f.name] and "\n" not in docs[f.name]


def test_config_reference_lists_every_field():
    text = config_reference()
    for section in dataclasses.fields(ExperimentConfig):
        for f in dataclasses.fields(type(getattr(ExperimentConfig(), section.name))):
            assert f"`{section.name}.{f.name}`" in text
    assert "One of: vbon, vbon_exact, kl_rl." in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: 1e-5\nvbon:\n  n: 4\ntrain:\n  steps: 3\n",
            r"line 5: key 'train' is given twice \(first on line 1\)",
        ),
        (
            "train:\n  lr: 1e-5\n  steps: 2\n  lr: 2e-5\n",
            r"line 4: key 'lr' is given twice \(first on line 2\)",
        ),
    ],
)
def test_duplicate_yaml_keys_name_the_key_and_line(tmp_path, text, message):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}; merge the two$"):
        load_config(path)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "generation:\n  eval_temperatures: [0.7, .nan]\n",
            r"generation\.eval_temperatures\[1\]: nan is not a finite",
        ),
        ("train:\n  adam_betas: [.nan, 0.95]\n", r"train\.adam_betas\[0\]: nan is not a finite number"),
        ("reward:\n  missing_eos_score: .nan\n", r"reward\.missing_eos_score: nan is not a finite number"),
    ],
)
def test_nan_in_lists_and_unbounded_floats_is_refused(tmp_path, source, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_yaml(tmp_path, source))


def test_nan_in_a_list_override_is_refused():
    with pytest.raises(ConfigError, match=r"generation\.eval_temperatures\[0\]: nan is not a finite number"):
        load_config(None, ["generation.eval_temperatures=[nan]"])


def test_non_utf8_config_file_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  output_dir: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at offset 24\)$"):
        load_config(path)


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_output_dir_is_refused(value):
    with pytest.raises(ConfigError, match=r"^train\.output_dir: empty; set the directory"):
        load_config(None, [f"train.output_dir={value}"])


# ---------------------------------------------------------------- one meaning per name


OFFLINE = "algo.name=dpo"


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [("samples_per_prompt", "subsets_per_prompt", 3), ("ppo_epochs", "offline_epochs", 2)],
)
@pytest.mark.parametrize("source", ["yaml", "set"])
def test_an_offline_run_takes_the_old_field_into_the_new_one_with_a_warning(
    tmp_path, capsys, old, new, value, source
):
    if source == "yaml":
        cfg = load_config(write_yaml(tmp_path, {"algo": {"name": "dpo", old: value}}))
    else:
        cfg = load_config(None, [OFFLINE, f"algo.{old}={value}"])
    assert getattr(cfg.algo, new) == value
    assert getattr(cfg.algo, old) == getattr(ExperimentConfig().algo, old)  # one field, one meaning
    assert capsys.readouterr().err == (
        f"vbon: warning: algo.{old} is deprecated for offline algorithms (algo.name=dpo); "
        f"use algo.{new} (set to {value} here)\n"
    )


def test_the_old_offline_fields_keep_their_defaults_equal_to_the_new_ones():
    """The move keys on values (a dump names every field): equal defaults make a default never move."""
    algo = ExperimentConfig().algo
    assert (algo.samples_per_prompt, algo.ppo_epochs) == (algo.subsets_per_prompt, algo.offline_epochs)


def test_the_new_offline_fields_win_and_on_policy_runs_keep_theirs(capsys):
    both = [
        "algo.samples_per_prompt=4",
        "algo.ppo_epochs=1",
        "algo.subsets_per_prompt=2",
        "algo.offline_epochs=3",
    ]
    offline = load_config(None, [OFFLINE, *both])
    assert (offline.algo.items_per_prompt, offline.algo.epochs) == (2, 3)
    rloo = load_config(None, ["algo.name=rloo", *both])
    assert (rloo.algo.items_per_prompt, rloo.algo.epochs) == (4, 1)
    assert capsys.readouterr().err == ""


def test_a_dumped_offline_config_reloads_equal_and_silent(tmp_path, capsys):
    cfg = load_config(None, [OFFLINE, "algo.samples_per_prompt=3"])
    capsys.readouterr()
    assert load_config(write_yaml(tmp_path, dump_config(cfg))) == cfg
    assert capsys.readouterr().err == ""


def test_value_coef_is_ignored_with_one_warning_per_load(tmp_path, capsys):
    path = write_yaml(tmp_path, {"algo": {"value_coef": 0.5, "clip_range": 0.3}})
    cfg = load_config(path, ["algo.value_coef=0.7"])
    assert cfg == load_config(None, ["algo.clip_range=0.3"])
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "vbon: warning: algo.value_coef is deprecated and ignored: it had no effect"
    )
    assert warnings[0].endswith("; remove it")


@pytest.mark.parametrize("objective", ["vbon", "vbon_exact"])
def test_vbon_beta_with_a_vbon_objective_is_refused(objective):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"vbon.objective={objective}", "vbon.n=5", "vbon.beta=0.1"])
    message = str(err.value)
    assert message.startswith(f"vbon.beta: 0.1 is set with vbon.objective={objective}")
    assert "1/(N-1) = 0.25 from vbon.n=5" in message and "vbon.objective=kl_rl" in message
    assert load_config(None, ["vbon.objective=kl_rl", "vbon.beta=0.1"]).vbon.beta == 0.1
