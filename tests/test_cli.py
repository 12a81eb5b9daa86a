"""The `vbon` command line: help, one-line errors with exit code 2, config printing."""

import re
import subprocess
import sys

import pytest
import yaml

from vbon_ds.cli import main

SUBCOMMANDS = ["train", "refcache", "evaluate", "bon", "demo", "toy", "config", "sweep"]


def run_vbon(*args):
    return subprocess.run(
        [sys.executable, "-m", "vbon_ds", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand():
    result = run_vbon("--help")
    assert result.returncode == 0
    # argparse lists each subcommand on its own line: "    name   help text".
    listed = re.findall(r"^    (\w+)\s+\S", result.stdout, flags=re.MULTILINE)
    assert set(listed) >= set(SUBCOMMANDS), listed


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vbon " + name in capsys.readouterr().out


def test_unknown_subcommand_is_one_line_exit_2():
    result = run_vbon("trian")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "invalid choice: 'trian'" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    result = run_vbon("train", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"vbon: error: config file not found: {tmp_path / 'nope.yaml'}"


def test_bad_override_is_one_line_exit_2():
    result = run_vbon("config", "--config", "launch/tldr_vbon.yaml", "--set", "vbon.n=0")
    assert result.returncode == 2
    assert result.stderr.strip() == "vbon: error: vbon.n: 0 is out of range (allowed: [2, inf])"


def test_config_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-5\n")
    assert main(["config", "--config", str(path), "--set", "vbon.n=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-5 and printed["vbon"]["n"] == 4


def test_config_reference_is_markdown(capsys):
    assert main(["config", "--reference"]) == 0
    assert "| `train.lr` | float | `3e-06` |" in capsys.readouterr().out


def test_recipes_in_launch_load():
    from pathlib import Path

    from vbon_ds.commands.sweep_file import load_sweep
    from vbon_ds.config import load_config

    recipes = sorted(Path("launch").glob("*.yaml"))
    assert recipes, "launch/ should hold experiment recipes"
    for recipe in recipes:
        if recipe.name.startswith("sweep_"):
            assert load_sweep(recipe).runs, recipe
        else:
            load_config(recipe)


def test_readme_config_reference_is_current():
    from pathlib import Path

    from vbon_ds.config import config_reference

    readme = Path(__file__).resolve().parent.parent / "README.md"
    section = (
        readme.read_text()
        .split("<!-- config-reference:start -->\n")[1]
        .split("\n<!-- config-reference:end -->")[0]
    )
    assert section == config_reference(), "README config reference is stale: paste `vbon config --reference`"


def test_a_full_disk_anywhere_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import vbon_ds.cli

    def full_disk(cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "events.out"))

    monkeypatch.setattr(vbon_ds.cli, "dump_config", full_disk)
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-5\n")
    assert main(["config", "--config", str(path)]) == 2
    file = tmp_path / "events.out"
    assert capsys.readouterr().err == (
        f"vbon: error: no space left on device while writing {file} (No space left on device)\n"
    )


PROCESS_GROUP_SCRIPT = """
import sys
import torch.distributed as dist
from vbon_ds import cli
from vbon_ds.engines.distributed import init_distributed

if sys.argv[1] == "before":
    init_distributed()
cli._cmd_toy = lambda args: init_distributed()
assert cli.main(["toy"]) == 0
print("initialized after main:", dist.is_initialized())
"""


@pytest.mark.parametrize(("when", "left"), [("inside", False), ("before", True)])
def test_main_leaves_the_process_group_it_joined_and_keeps_one_it_found(when, left):
    # gloo can abort in its destructor at interpreter exit, so the command destroys the group it made; a
    # caller's own group (tests, notebooks) is left alone.
    result = subprocess.run(
        [sys.executable, "-c", PROCESS_GROUP_SCRIPT, when], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"initialized after main: {left}" in result.stdout


def test_plan_help_states_the_exit_codes_plan_returns(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    stated = re.search(r"exit status: 0 fits the card, (\d+) does not fit, (\d+) config error", help_text)
    assert stated, help_text
    plan = ["plan", "--config", "launch/tldr_vbon.yaml", "--world-size", "8"]
    assert main([*plan, "--gpu-memory-gb", "1e-6"]) == int(stated[1])
    assert main([*plan, "--set", "vbon.n=0"]) == int(stated[2])
    assert main(plan) == 0
