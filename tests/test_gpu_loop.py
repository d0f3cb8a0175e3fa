"""benchmarks/gpu_loop.sh in its dry-run mode: the GPU loop check's own commands, tiny and on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_loop_dry_run_writes_the_loop_table(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, LOOP_IMAGES="32", LOOP_STEPS="4")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_loop.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "loop.json").read_text())
    assert report["step_img_per_s"] > 0
    assert [r["mode"] for r in report["loop"]] == ["cpu", "device", "synthetic"]
    for r in report["loop"]:
        assert "error" not in r, r
        assert r["img_per_s"] > 0 and 0.0 <= r["data_wait"] <= 1.0 and r["vs_step"] > 0
    assert report["decode_diff"]["mean_abs_diff_levels"] == 0.0  # on the CPU both modes crop alike
    per_worker = [(r["loader"], r["decode"]) for r in report["per_worker"]["data"]]
    assert per_worker == [("mae", "cpu"), ("mae", "device"), ("reference", "cpu")]
    table = (tmp_path / "loop.md").read_text()
    assert "| synthetic |" in table and "vs step" in table
