"""launch/offline_node.sh install: wheels into a site folder with no index, then every requirement and module
checked, on this machine's environment (which holds all of vbon_ds's needs). The `wheels` verb downloads from
an index: it was run by hand (README, "Air-gapped nodes")."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "offline_node.sh"


def make_wheel(folder: Path, name: str, requires: list[str], code: str = "VALUE = 1\n") -> Path:
    """A minimal pure-Python wheel of one package `name` running `code`, version 1.0, needing `requires`."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": code,
        f"{info}/METADATA": "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0"]
            + [f"Requires-Dist: {requirement}" for requirement in requires]
        )
        + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"]))
    return wheel


def install(kit: Path | str, site: Path | str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), "install", str(kit), str(site)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_a_node_that_has_the_rest_installs_the_wheels_and_prints_the_path(tmp_path):
    make_wheel(tmp_path / "kit", "kit_extra", ["numpy"])
    result = install("kit", "site", cwd=tmp_path)  # paths relative to where it is called from
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "kit_extra" / "__init__.py").is_file()
    assert f"ready; export PYTHONPATH={tmp_path / 'site'}" in result.stdout


def test_a_requirement_the_node_lacks_is_named_and_fails(tmp_path):
    make_wheel(tmp_path / "kit", "kit_needy", ["vbon-absent-package>=2"])
    result = install(tmp_path / "kit", tmp_path / "site")
    assert result.returncode == 1
    assert "the node lacks what vbon_ds needs" in result.stderr
    assert "kit-needy 1.0 requires vbon-absent-package" in result.stderr


def test_a_module_a_run_imports_that_fails_to_load_is_named(tmp_path):
    # A broken gguf first on the path, as a wheel built for another Python would be.
    make_wheel(tmp_path / "kit", "gguf", [], code="raise ImportError('built for another Python')\n")
    result = install(tmp_path / "kit", tmp_path / "site")
    assert result.returncode == 1
    assert "missing: import gguf: ImportError: built for another Python" in result.stderr


def test_an_empty_kit_and_bad_calls_exit_2_with_the_usage(tmp_path):
    (tmp_path / "kit").mkdir()
    empty = install(tmp_path / "kit", tmp_path / "site")
    assert empty.returncode == 2 and f"no wheels in {tmp_path / 'kit'}" in empty.stderr
    for words in ([], ["install", "only-one"], ["fetch", "a", "b"], ["wheels"]):
        bad = subprocess.run([str(SCRIPT), *words], capture_output=True, text=True, check=False)
        assert bad.returncode == 2 and bad.stderr.startswith("usage: launch/offline_node.sh"), words
