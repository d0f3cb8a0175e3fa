"""benchmarks/gpu_results.py: the results file of a GPU check (every key a measurement or null with its reason,
each lever before -> after with its verdict) and the docs' table generated from results files."""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mae.perf.step import StepConfig, StepResult

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_results  # noqa: E402

PEAK = 750.0  # TFLOP/s, the same-run GEMM peak of the reports below


def _row(img_s: float, batch: int = 64, error: str = "", **cfg) -> dict:
    c = StepConfig(batch=batch, dtype="bf16", compile=True, **cfg)
    tflops = img_s * 0.17
    r = StepResult(c, attn_used="sdpa", img_per_s=img_s, step_ms=batch / img_s * 1e3 if img_s else 0.0,
                   tflops=tflops, mfu_measured=tflops / PEAK, peak_mem_gb=batch / 8, warmup_s=60.0, error=error)  # fmt: skip
    return {**asdict(r), "config": asdict(c)}


def _report(model: str, recipe: str, rows: list[dict]) -> dict:
    return {"device": "NVIDIA H200", "torch": "2.11.0", "model": model, "recipe": recipe, "matmul_size": 8192,
            "rounds": 1, "matmul_peak_tflops": {"bf16": PEAK}, "results": rows}  # fmt: skip


def _run(work: Path, name: str, rates: list[float], waits: list[float], batch: int = 128, decode: str = "cpu",
         compile_: str = "auto"):  # fmt: skip
    run = work / "loop_work" / f"run_{name}"
    run.mkdir(parents=True)
    rows = [
        {"step": 20 * (i + 1), "img_per_s": r, "data_wait": w} for i, (r, w) in enumerate(zip(rates, waits))
    ]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [{"step": 0, "loss": 1.0}, *rows])
    )
    (run / "config.yaml").write_text(
        f"train: {{batch_size: {batch}, compile: {compile_}, precision: auto}}\n"
        f"data: {{num_workers: 10, decode: {decode}}}\n"
    )


@pytest.fixture
def work(tmp_path) -> Path:
    """The raw reports of a GPU check in which every section ran."""
    w = tmp_path / "work"
    w.mkdir()
    vit_l = [
        _row(1000.0),
        _row(1010.0, optimizer="fused-capturable"),
        _row(900.0, noise="host"),
        _row(1300.0, 128),
    ]
    (w / "step_vit_l.json").write_text(json.dumps(_report("mae_vit_large_patch16", "vit_large", vit_l)))
    vit_b = [_row(2000.0, 128), _row(2100.0, 128, loss="eager")]
    (w / "step_vit_b.json").write_text(json.dumps(_report("mae_vit_base_patch16", "vit_base", vit_b)))
    _run(w, "cpu", [500.0, 1500.0, 1600.0, 1700.0], [0.9, 0.3, 0.2, 0.25])
    _run(w, "device", [500.0, 1900.0, 1950.0, 1980.0], [0.9, 0.05, 0.04, 0.02], decode="device")
    _run(w, "synthetic", [500.0, 1980.0, 1990.0], [0.9, 0.0, 0.0], decode="auto")
    _run(w, "synthetic_reduce-overhead", [300.0, 2200.0, 2250.0], [0.9, 0.0, 0.0], decode="auto",
         compile_="reduce-overhead")  # fmt: skip
    (w / "env.json").write_text(
        json.dumps({"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "driver": "580"})
    )
    (w / "sections.txt").write_text("env 0 3 15\nstep:vit_l 0 120 135\nstep:vit_b 0 70 75\nloop 0 130 135\n")
    return w


META = {"date": "2026-12-07", "sections_requested": ["env", "attn", "step", "loop", "batch", "ref", "xformers",
                                                     "segment", "embed"]}  # fmt: skip


def test_defaults_loops_and_levers_from_the_raw_reports(work):
    res = gpu_results.build(work, META)
    assert res["gemm_peak_tflops"] == PEAK and res["gemm_dtype"] == "bf16"
    large = res["vit_large_default"]
    assert (large["img_s"], large["batch"], large["compile"], large["recipe"]) == (
        1000.0,
        64,
        "on",
        "vit_large",
    )
    assert large["mfu"] == pytest.approx(170.0 / PEAK) and large["peak_gb"] == 8.0
    device = res["loop_vit_base_jpeg_device"]
    assert device["img_s"] == 1950.0 and device["data_wait"] == 0.04  # medians, the first window left out
    assert device["frac_of_step"] == pytest.approx(1950.0 / 2000.0) and device["step_img_s"] == 2000.0
    assert (device["batch"], device["workers"], device["decode"]) == (128, 10, "device")
    assert res["loop_vit_base_jpeg_cpu"]["frac_of_step"] == pytest.approx(0.8)
    lv = res["levers"]
    assert (lv["fused_adamw_capturable"]["ratio"], lv["fused_adamw_capturable"]["verdict"]) == (
        1.01,
        "dropped",
    )
    batch = lv["vit_large_batch_x2"]
    assert (batch["before_img_s"], batch["after_img_s"], batch["verdict"]) == (1000.0, 1300.0, "kept")
    before, after = batch["lr_rule"]
    assert (before["batch"], after["batch"]) == (64, 128) and after["grad_accum"] == before["grad_accum"] // 2
    assert before["effective_batch"] == after["effective_batch"] == 4096 and before["lr"] == after["lr"]
    # levers whose 'after' is today's code: the row that differs is 'before'
    noise = lv["masking_noise_on_device"]
    assert (noise["before_img_s"], noise["after_img_s"], noise["verdict"]) == (900.0, 1000.0, "kept")
    loss = lv["loss_in_compiled_graph"]
    assert (loss["before_img_s"], loss["after_img_s"], loss["verdict"]) == (2100.0, 2000.0, "dropped")
    graphs = lv["cuda_graphs_in_loop"]
    assert (graphs["before_img_s"], graphs["after_img_s"], graphs["verdict"]) == (1985.0, 2225.0, "kept")
    assert graphs["train_compile"] == ["auto", "reduce-overhead"]  # what the runs' config.yaml say they ran
    assert gpu_results.missing_keys(res) == []


def test_what_did_not_run_is_null_with_its_reason(work):
    (work / "sections.txt").write_text(
        "env 0 3 15\nstep:vit_l 124 135 135\nstep:vit_b 1 5 75\nbatch skipped 0 40\n"
    )
    (work / "step_vit_l.json").write_text(
        json.dumps(_report("mae_vit_large_patch16", "vit_large", [_row(1000.0)]))
    )
    (work / "step_vit_b.json").unlink()
    (work / "notes.txt").write_text("segment\tmae/segment.py is not in this checkout\n")
    for d in (work / "loop_work").iterdir():
        (d / "metrics.jsonl").unlink()
    res = gpu_results.build(work, {**META, "sections_requested": ["env", "step", "batch", "segment"]})
    why = res["reasons"]
    assert res["vit_large_default"]["img_s"] == 1000.0  # measured before the limit stopped the levers
    assert res["levers"]["vit_large_batch_x2"] is None
    assert why["levers.vit_large_batch_x2"] == "stopped at its 135 s limit before this was measured"
    assert (
        res["vit_base_default"] is None
        and why["vit_base_default"] == "step:vit_b failed (exit 1); see gpu_check.log"
    )
    assert why["batch_sweep"] == "skipped: the time budget was spent"
    assert why["loop_vit_base_jpeg_device"] == "section loop was not run (SECTIONS=env,step,batch,segment)"
    assert why["segment_demo_img_s"] == "mae/segment.py is not in this checkout"
    assert all(res[k] is None for k in ("xformers", "reference_vit_base_img_s", "embed_vit_base_img_s"))
    assert gpu_results.missing_keys(res) == []
    assert gpu_results.missing_keys({**res, "reasons": {}}) == [k for k in gpu_results.KEYS if res[k] is None]


def test_an_out_of_memory_lever_keeps_its_error(work):
    rows = [_row(1000.0), _row(0.0, 128, error="out of memory")]
    (work / "step_vit_l.json").write_text(json.dumps(_report("mae_vit_large_patch16", "vit_large", rows)))
    res = gpu_results.build(work, META)
    assert res["levers"]["vit_large_batch_x2"] is None
    assert res["reasons"]["levers.vit_large_batch_x2"] == "out of memory"


@pytest.mark.parametrize(
    "name, slug",
    [("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
     ("NVIDIA GH200 480GB", "gh200"), ("Some Accelerator", "some-accelerator")],
)  # fmt: skip
def test_the_file_is_named_after_the_device(name, slug):
    assert gpu_results.device_slug(name, dry_run=False) == slug
    assert gpu_results.device_slug(name, dry_run=True) == "dryrun"


def _results(work: Path, date: str) -> dict:
    res = gpu_results.build(work, {**META, "date": date})
    return res


def test_the_doc_block_is_rewritten_from_the_files_newest_first(work, tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Perf\n\nbefore\n\n{gpu_results.BEGIN}\nold table\n{gpu_results.END}\n\nafter\n")
    older, newer = tmp_path / "h200-2026-11-30.json", tmp_path / "h200-2026-12-07.json"
    older.write_text(json.dumps(_results(work, "2026-11-30")))
    res = _results(work, "2026-12-07")
    res["vit_large_default"]["img_s"] = 1234.0
    newer.write_text(json.dumps(res))
    gpu_results.main([str(older), str(newer), "--doc", str(doc)])
    text = doc.read_text()
    assert (
        text.startswith("# Perf\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    )
    assert text.index("h200-2026-12-07.json") < text.index("h200-2026-11-30.json")
    for part in ("| ViT-L/16, recipe=vit_large as run | 1,234 | batch 64, compile on, bf16: MFU 22.7%, peak 8.0 GB |",
                 "| loop, ViT-B, JPEG decoded on the device | 1,950 | 97.5% of the compiled step, data wait 4.0%",
                 "twice the images per GPU, effective batch and lr kept | 1,000 -> 1,300 | 1.300 | kept |",
                 "reduce-overhead (CUDA graphs) | 1,985 -> 2,225 | 1.121 | kept |",
                 "| xformers (pinned pair) | — (no result) | |"):  # fmt: skip
        assert part in text, part
    broken = tmp_path / "h200-2026-12-08.json"
    broken.write_text(json.dumps({**res, "vit_base_default": None, "reasons": {}}))
    with pytest.raises(SystemExit, match="vit_base_default"):
        gpu_results.main([str(broken), "--doc", str(doc)])


def test_the_docs_table_is_the_one_generated_from_the_committed_results():
    files = [
        p
        for p in sorted((ROOT / "benchmarks" / "results").glob("*.json"))
        if "schema" in json.loads(p.read_text())
    ]
    block = gpu_results.write_doc(files, None)
    assert block in (ROOT / "docs" / "performance.md").read_text(), (
        "regenerate: python benchmarks/gpu_results.py " + " ".join(str(f.relative_to(ROOT)) for f in files)
    )
