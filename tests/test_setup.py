"""Set-up and launch are quiet: no packaging deprecations, and `accelerate launch` without its warning block."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PASSED = "values were not passed to `accelerate launch`"


def test_pyproject_has_no_deprecated_metadata():
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # setuptools warns about license tables, classifiers, ...
        meta = read_configuration(ROOT / "pyproject.toml")
    assert meta["project"]["license"] == "Apache-2.0"


def _launch(tmp_path, env) -> subprocess.CompletedProcess:
    script = tmp_path / "hello.py"
    script.write_text("print('hello from the launched process')\n")
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return subprocess.run([*accelerate, str(script)], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_setup_writes_accelerates_default_config_once_and_launch_is_quiet(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "OMP_NUM_THREADS"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # where accelerate looks for its default config
    before = _launch(tmp_path, env)
    assert before.returncode == 0 and NOT_PASSED in before.stderr  # what a user without a config sees

    step = [sys.executable, str(ROOT / "scripts" / "accelerate_config.py")]
    r = subprocess.run(step, env=env, capture_output=True, text=True, timeout=120)
    config = tmp_path / "hf" / "accelerate" / "default_config.yaml"
    assert r.returncode == 0 and r.stdout.startswith(f"accelerate: wrote its default config to {config}")
    assert json.loads(config.read_text())["num_machines"] == 1

    after = _launch(tmp_path, env)
    assert after.returncode == 0 and "hello from the launched process" in after.stdout
    assert after.stderr == ""

    # a config of the user's own is kept
    config.write_text(config.read_text().replace('"debug": false', '"debug": true'))
    r = subprocess.run(step, env=env, capture_output=True, text=True, timeout=120)
    assert (
        r.stdout.strip() == f"accelerate: using your config {config}"
        and '"debug": true' in config.read_text()
    )
