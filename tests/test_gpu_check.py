"""benchmarks/gpu_check.sh: its dry run (tiny models on the CPU) goes through every default section and
writes the summary the docs quote; the time budget skips what it cannot fit instead of overrunning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "GPU_CHECK_DRY_RUN": "1",
        "PYTHON": sys.executable,
        "WHEELS": str(out / "no-wheels"),
        **env,
    }
    cmd = ["bash", "benchmarks/gpu_check.sh", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_spent_budget_skips_every_section_and_still_summarises(tmp_path):
    r = gpu_check(tmp_path, GPU_CHECK_DRY_RUN_BUDGET="0", SECTIONS="env,step,batch")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("env", "step", "batch"):
        assert f"== {name}: skipped" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["section"] for s in summary["sections"]} == {"env", "step:vit_l", "step:vit_b", "batch"}
    assert all(s["exit"] == "skipped" for s in summary["sections"]) and summary["reports"] == {}


@pytest.mark.slow
def test_dry_run_measures_every_default_section(tmp_path):
    r = gpu_check(tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "summary.json", "gpu_check.log"} <= files and len(files) <= 8
    summary = json.loads((out / "summary.json").read_text())
    ran = {s["section"]: s["exit"] for s in summary["sections"]}
    expected = ("env", "attn", "step:vit_l", "step:vit_b", "batch", "ref")
    assert {k: ran.get(k) for k in expected} == dict.fromkeys(expected, "0")
    reports = summary["reports"]
    assert set(reports) == {"step_vit_b", "step_vit_l", "batch_vit_l", "reference"}
    step_b = reports["step_vit_b"]["results"]
    assert [r["config"]["compile"] for r in step_b] == [False]  # GPU_CHECK_DRY_COMPILE=1 adds compiled rows
    assert all(not r["error"] and r["img_per_s"] > 0 and 0 < r["mfu_measured"] for r in step_b)
    assert [r["side"] for r in reports["reference"]["results"]][0].startswith("reference release")
    md = (out / "summary.md").read_text()
    for part in ("**best: mae_vit_tiny_patch16**", "**best: mae_vit_small_patch16**", "Largest batch that fits",
                 "| reference release (timm blocks) |", "| this project |"):  # fmt: skip
        assert part in md, part
    assert "attn xformers: runs as sdpa" in r.stdout  # no xformers here: the proof says so and moves on


def _report(model, rows, peak=1000.0):
    results = []
    for batch, compile_, mode, rate, error in rows:
        config = {"batch": batch, "compile": compile_, "compile_mode": mode}
        results.append({"config": config, "error": error, "img_per_s": rate, "tflops": rate / 10,
                        "mfu_measured": rate / 10 / peak, "mfu_nominal": None, "peak_mem_gb": 1.0, "warmup_s": 2.0})  # fmt: skip
    return {"model": model, "device": "GPU", "torch": "2.11", "matmul_size": 8192, "rounds": 2,
            "matmul_peak_tflops": {"bf16": peak}, "results": results}  # fmt: skip


def test_summary_names_eager_compiled_best_and_the_largest_batch(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_summary import main

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    steps = [(128, False, "default", 1800.0, ""), (128, True, "default", 2400.0, ""),
             (128, True, "reduce-overhead", 0.0, "RuntimeError: graph capture failed")]  # fmt: skip
    (work / "step_vit_l.json").write_text(json.dumps(_report("mae_vit_large_patch16", steps)))
    batches = [(256, False, "default", 1900.0, ""), (512, False, "default", 1950.0, ""),
               (1024, False, "default", 0.0, "out of memory")]  # fmt: skip
    (work / "batch_vit_l.json").write_text(json.dumps(_report("mae_vit_large_patch16", batches)))
    ref = _report(
        "mae_vit_large_patch16", [(128, False, "default", 1700.0, ""), (128, False, "default", 1800.0, "")]
    )
    for row, side in zip(ref["results"], ("reference release (timm blocks)", "this project")):
        row["side"] = side
    (work / "reference.json").write_text(json.dumps(ref))
    (work / "sections.txt").write_text("step 0 120\nbatch 124 75\n")
    assert main([str(work), str(out)]) == 0
    md = (out / "summary.md").read_text()
    for part in ("| mae_vit_large_patch16 | 128 | eager | 1,800 | 180.0 | 18.0% |",
                 "| mae_vit_large_patch16 | 128 | compiled | 2,400 |",
                 "| compiled, reduce-overhead | RuntimeError: graph capture failed |",
                 "| **best: mae_vit_large_patch16** | 128 | compiled | **2,400** |",
                 "| this project | 1,800 | 18.0% | 1.0 | 1.06x |",
                 "Largest batch that fits (mae_vit_large_patch16, eager): **512**",
                 "| batch | 124 | 75 |"):  # fmt: skip
        assert part in md, (part, md)
    assert set(json.loads((out / "summary.json").read_text())["reports"]) == {
        "step_vit_l",
        "batch_vit_l",
        "reference",
    }
