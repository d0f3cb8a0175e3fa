"""Fold the raw reports of benchmarks/gpu_check.sh into summary.json and summary.md.

    python benchmarks/gpu_summary.py WORK_DIR OUT_DIR

WORK_DIR holds mae-bench JSON reports (step_vit_b, step_vit_l, batch_vit_l, tune_vit_l), reference.json
(benchmarks/reference_step.py), sections.txt (name, exit code, seconds per section) and loop/loop.json.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

REPORTS = ("step_vit_b", "step_vit_l", "tune_vit_l", "batch_vit_l", "reference")


def _ok(report: dict) -> list[dict]:
    return [r for r in report["results"] if not r["error"]]


def _compile(c: dict) -> str:
    if not c["compile"]:
        return "eager"
    return "compiled" if c.get("compile_mode", "default") == "default" else f"compiled, {c['compile_mode']}"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def _mfu(r: dict) -> str:
    nominal = f" / {100 * r['mfu_nominal']:.1f}%" if r.get("mfu_nominal") else ""
    return f"{100 * r['mfu_measured']:.1f}%{nominal}"


def step_table(reports: dict) -> list[str]:
    lines = ["| model | batch | compile | img/s | TFLOP/s | MFU (same-run GEMM peak / nominal) | peak GB | warm-up s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for key in ("step_vit_b", "step_vit_l", "tune_vit_l"):
        if key not in reports:
            continue
        rep = reports[key]
        for r in rep["results"]:
            c = r["config"]
            head = f"| {rep['model']} | {c['batch']} | {_compile(c)} |"
            if r["error"]:
                lines.append(f"{head} {r['error']} | | | | |")
                continue
            lines.append(f"{head} {_rate(r['img_per_s'])} | {r['tflops']:.1f} | {_mfu(r)} | {r['peak_mem_gb']:.1f} | "
                         f"{r['warmup_s']:.0f} |")  # fmt: skip
    best = {}
    for key in ("step_vit_b", "step_vit_l", "tune_vit_l"):
        for r in _ok(reports.get(key, {"results": []})):
            model = reports[key]["model"]
            if model not in best or r["img_per_s"] > best[model]["img_per_s"]:
                best[model] = r
    for model, r in best.items():
        lines.append(f"| **best: {model}** | {r['config']['batch']} | {_compile(r['config'])} | "
                     f"**{_rate(r['img_per_s'])}** | {r['tflops']:.1f} | **{_mfu(r)}** | {r['peak_mem_gb']:.1f} | |")  # fmt: skip
    return lines


def reference_table(rep: dict) -> list[str]:
    rows = {r["side"]: r for r in _ok(rep)}
    ref = next((r for side, r in rows.items() if side.startswith("reference")), None)
    lines = [f"{rep['model']}, batch {rep['results'][0]['config']['batch']}, eager, one identical step, best of "
             f"{rep['rounds']} rounds:", "", "| side | img/s | MFU (same-run GEMM peak) | peak GB | vs reference |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for side, r in rows.items():
        ratio = f"{r['img_per_s'] / ref['img_per_s']:.2f}x" if ref else ""
        lines.append(f"| {side} | {_rate(r['img_per_s'])} | {100 * r['mfu_measured']:.1f}% | "
                     f"{r['peak_mem_gb']:.1f} | {ratio} |")  # fmt: skip
    return lines


def batch_table(rep: dict) -> list[str]:
    lines = ["| batch | img/s | MFU | peak GB |", "| --- | --- | --- | --- |"]
    for r in rep["results"]:
        if r["error"]:
            lines.append(f"| {r['config']['batch']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['config']['batch']} | {_rate(r['img_per_s'])} | {100 * r['mfu_measured']:.1f}% | "
                         f"{r['peak_mem_gb']:.1f} |")  # fmt: skip
    fits = [r["config"]["batch"] for r in _ok(rep)]
    tried = [r["config"]["batch"] for r in rep["results"]]
    if not fits:
        verdict = f"none of {tried} fits"
    elif max(fits) == max(tried):
        verdict = f"{max(fits)} (the largest tried; larger may fit)"
    else:
        verdict = str(max(fits))
    return [*lines, "", f"Largest batch that fits ({rep['model']}, eager): **{verdict}**"]


def summarize(work: Path) -> tuple[dict, str]:
    reports = {
        k: json.loads((work / f"{k}.json").read_text()) for k in REPORTS if (work / f"{k}.json").is_file()
    }
    sections = []
    if (work / "sections.txt").is_file():
        for line in (work / "sections.txt").read_text().splitlines():
            name, rc, seconds = line.split()
            sections.append({"section": name, "exit": rc, "seconds": int(seconds)})
    loop = work / "loop" / "loop.json"
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sections": sections,
        "reports": reports,
        "loop": json.loads(loop.read_text()) if loop.is_file() else None,
    }
    any_rep = next(iter(reports.values()), None)
    md = ["# GPU check", ""]
    if any_rep:
        peaks = sorted(
            {f"{v:.1f}" for r in reports.values() for v in r["matmul_peak_tflops"].values()}, key=float
        )
        md += [f"{any_rep['device']}, torch {any_rep['torch']}, {summary['date']}. Same-run GEMM peak "
               f"({any_rep['matmul_size']}^3, per run): {', '.join(peaks)} TFLOP/s; MFU is against the peak of "
               "the same run.", ""]  # fmt: skip
    if any(k in reports for k in ("step_vit_b", "step_vit_l", "tune_vit_l")):
        md += ["## MAE training step (autocast, backward, fused AdamW, sdpa)", "", *step_table(reports), ""]
    if "reference" in reports:
        md += ["## Side by side with the reference release", "", *reference_table(reports["reference"]), ""]
    if "batch_vit_l" in reports:
        md += ["## Batch size", "", *batch_table(reports["batch_vit_l"]), ""]
    if sections:
        md += ["## Sections", "", "| section | exit | seconds |", "| --- | --- | --- |"]
        md += [f"| {s['section']} | {s['exit']} | {s['seconds']} |" for s in sections]
    return summary, "\n".join(md) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: gpu_summary.py WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    work, out = Path(argv[0]), Path(argv[1])
    summary, md = summarize(work)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
