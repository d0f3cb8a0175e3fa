"""benchmarks/gpu_check.sh: its dry run (tiny models on the CPU) goes through every default section and writes
the results file (every key a measurement or null with its reason) that the docs' table is generated from; the
time budget skips what it cannot fit instead of overrunning, and the real run's limits fit 9 minutes."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mae.perf.step import StepConfig, StepResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_results  # noqa: E402


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


def test_spent_budget_skips_every_section_and_still_writes_the_results_file(tmp_path):
    r = gpu_check(tmp_path, GPU_CHECK_DRY_RUN_BUDGET="0", SECTIONS="env,step,batch")
    assert r.returncode == 0, r.stdout + r.stderr
    for label in ("env", "step:vit_l", "step:vit_b", "batch"):
        assert f"== {label}: skipped" in r.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {s["section"] for s in summary["sections"]} == {"env", "step:vit_l", "step:vit_b", "batch"}
    assert all(s["exit"] == "skipped" for s in summary["sections"]) and summary["reports"] == {}
    (path,) = tmp_path.glob("dryrun-*.json")
    assert re.fullmatch(
        r"dryrun-\d{4}-\d{2}-\d{2}-env_step_batch\.json", path.name
    )  # some sections: own name
    res = json.loads(path.read_text())
    assert all(res[k] is None for k in gpu_results.KEYS) and gpu_results.missing_keys(res) == []
    assert res["reasons"]["vit_large_default"] == "skipped: the time budget was spent"
    assert res["reasons"]["xformers"] == "section xformers was not run (SECTIONS=env,step,batch)"


def _limits() -> dict[str, int]:
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    table = re.search(r"declare -A LIMIT=\((.*?)\)\n", text, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"\[([\w:]+)\]=(\d+)", table)}


def test_the_real_runs_section_limits_fit_nine_minutes():
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    limits = _limits()
    sections = re.search(r"^ALL_SECTIONS=([\w,]+)$", text, re.M).group(1).split(",")
    assert "tune" not in sections and set(sections) == {k.split(":")[0] for k in limits} - {"tune"}
    assert sum(v for k, v in limits.items() if k.split(":")[0] in sections) <= 540
    assert int(re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}", text).group(1)) <= 540


def _struct_ok(value, fields) -> bool:
    return isinstance(value, dict) and all(isinstance(value[f], (int, float)) for f in fields)


@pytest.mark.slow
def test_dry_run_writes_every_key_and_the_docs_table_is_generated_from_it(tmp_path):
    r = gpu_check(tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out"
    files = {p.name for p in out.iterdir()}
    (results_file,) = [f for f in files if re.fullmatch(r"dryrun-\d{4}-\d{2}-\d{2}\.json", f)]
    stem = results_file.removesuffix(".json")
    assert files == {results_file, f"{stem}-profile.txt", "summary.md", "summary.json", "gpu_check.log"}
    summary = json.loads((out / "summary.json").read_text())
    ran = {s["section"]: s["exit"] for s in summary["sections"]}
    expected = (
        "env",
        "attn",
        "step:vit_l",
        "step:vit_b",
        "loop",
        "batch",
        "ref:vit_b",
        "ref:vit_l",
        "xformers:device",
    )
    assert {k: ran.get(k) for k in expected} == dict.fromkeys(expected, "0")
    assert "attn xformers: runs as sdpa" in r.stdout  # no xformers here: the proof says so and moves on

    res = json.loads((out / results_file).read_text())
    assert gpu_results.missing_keys(res) == [] and res["dry_run"] is True
    assert isinstance(res["gemm_peak_tflops"], float) and res["gemm_peak_tflops"] > 0
    for key in ("vit_large_default", "vit_base_default"):
        assert _struct_ok(res[key], ("img_s", "mfu", "batch", "peak_gb")) and 0 < res[key]["mfu"] < 1
    assert (res["vit_large_default"]["recipe"], res["vit_base_default"]["batch"]) == ("vit_large", 8)
    for key in ("loop_vit_base_jpeg_device", "loop_vit_base_jpeg_cpu", "loop_vit_base_synthetic"):
        assert (
            _struct_ok(res[key], ("img_s", "frac_of_step", "data_wait")) and 0 <= res[key]["data_wait"] <= 1
        )
        assert res[key]["frac_of_step"] == pytest.approx(res[key]["img_s"] / res["vit_base_default"]["img_s"])
    assert res["reference_vit_base_img_s"] > 0 and res["reference_vit_large_img_s"] > 0
    sweep = res["batch_sweep"]
    assert [row["batch"] for row in sweep["rows"]] == [2, 4] and sweep["largest_fit"] == 4
    assert all(row["img_s"] > 0 and row["peak_gb"] > 0 for row in sweep["rows"])
    assert res["xformers"] is None and "pinned pair" in res["reasons"]["xformers"]
    device_xf = res["xformers_device_torch"]
    assert device_xf["ran_kernel"] is False and device_xf["sdpa_img_s"] > 0
    for key, module in (("segment_demo_img_s", "segment"), ("detect_demo_img_s", "detect"),
                        ("detect_vit_base_1024", "detect"), ("embed_vit_base_img_s", "embed")):  # fmt: skip
        if (ROOT / "mae" / f"{module}.py").exists():
            assert res[key] is not None or res["reasons"][key]
        else:
            assert res[key] is None and res["reasons"][key] == f"mae/{module}.py is not in this checkout"
    assert set(res["levers"]) == {"fused_adamw_capturable", "vit_large_batch_x2", "masking_noise_on_device",
                                  "loss_in_compiled_graph", "cuda_graphs_in_loop"}  # fmt: skip
    for lever in res["levers"].values():
        assert lever["ratio"] == pytest.approx(lever["after_img_s"] / lever["before_img_s"])
        assert lever["verdict"] == ("kept" if lever["ratio"] >= gpu_results.KEEP_RATIO else "dropped")
    assert res["profile"] == f"{stem}-profile.txt" and "aten::mm" in (out / res["profile"]).read_text()

    # the generator makes the docs' table from this file, with its values
    doc = tmp_path / "performance.md"
    doc.write_text((ROOT / "docs" / "performance.md").read_text())
    gpu_results.main([str(out / results_file), "--doc", str(doc)])
    text = doc.read_text()
    large, device = res["vit_large_default"], res["loop_vit_base_jpeg_device"]
    for part in (f"#### `{results_file}`", f"| ViT-L/16, recipe=vit_large as run | {large['img_s']:,.0f} | batch 2",
                 f"MFU {100 * large['mfu']:.1f}%", f"{100 * device['frac_of_step']:.1f}% of the compiled step",
                 f"data wait {100 * device['data_wait']:.1f}%", res["reasons"]["xformers"],
                 "Largest that fits: 4"):  # fmt: skip
        assert part in text, part
    assert (
        text.split(gpu_results.BEGIN)[0]
        == (ROOT / "docs" / "performance.md").read_text().split(gpu_results.BEGIN)[0]
    )
    assert (out / "summary.md").read_text().startswith("# GPU check\n\n#### `" + results_file)


def _report(model, rows, peak=1000.0):
    results = []
    for batch, compile_, mode, rate, error in rows:
        c = StepConfig(batch=batch, compile=compile_, compile_mode=mode)
        r = StepResult(c, attn_used="sdpa", img_per_s=rate, tflops=rate / 10, mfu_measured=rate / 10 / peak,
                       peak_mem_gb=1.0, warmup_s=2.0, error=error)  # fmt: skip
        results.append({**asdict(r), "config": asdict(c)})
    return {"model": model, "device": "GPU", "torch": "2.11", "matmul_size": 8192, "rounds": 2, "recipe": "",
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
    (work / "reference_vit_l.json").write_text(json.dumps(ref))
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
        "reference_vit_l",
    }
