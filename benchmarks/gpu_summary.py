"""Fold the raw reports of benchmarks/gpu_check.sh into the results file, summary.json and summary.md.

    python benchmarks/gpu_summary.py WORK_DIR OUT_DIR [--date YYYY-MM-DD] [--dry-run] [--budget S] [--sections LIST]
                                     [--suffix NAME]

WORK_DIR holds mae-bench JSON reports (step_vit_b, step_vit_l, batch_vit_l, tune_vit_l), reference_vit_b and
reference_vit_l (benchmarks/reference_step.py), sections.txt (label, exit code, seconds, limit per section),
notes.txt (label and why it did not run), env.json, profile_vit_large.txt, xformers_*.json, the loop's runs
(loop_work/) and those of segment and embed. OUT_DIR receives `<device>-<date>.json` (benchmarks/gpu_results.py),
`<device>-<date>-profile.txt` (`<device>-<date>-<suffix>...` with --suffix), summary.json (every raw report) and summary.md (the results table, then the raw
tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_results  # noqa: E402

REPORTS = ("step_vit_b", "step_vit_l", "tune_vit_l", "batch_vit_l", "reference_vit_b", "reference_vit_l")


def _ok(report: dict) -> list[dict]:
    return [r for r in report["results"] if not r["error"]]


def _compile(c: dict) -> str:
    """'eager' / 'compiled' / 'compiled, MODE', then what differs from the loop's step (the levers)."""
    label = "eager" if not c["compile"] else "compiled"
    if c["compile"] and c.get("compile_mode", "default") != "default":
        label += f", {c['compile_mode']}"
    if c.get("optimizer", "fused") != "fused":
        label += f"; {c['optimizer']} AdamW"
    if c.get("loss", "graph") != "graph":
        label += f"; loss {c['loss']}"
    if c.get("noise", "device") != "device":
        label += f"; noise from the {c['noise']}"
    return label


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
        for label, s in gpu_results.read_sections(work).items():
            sections.append({"section": label, **s})
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sections": sections,
        "reports": reports,
        "loop_logs": {
            p.stem: p.read_text().splitlines()[-8:] for p in sorted(work.glob("loop_work/loop_*.log"))
        },
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
    for key in ("reference_vit_b", "reference_vit_l"):
        if key in reports:
            md += [f"## Side by side with the reference release: {reports[key]['model']}", "",
                   *reference_table(reports[key]), ""]  # fmt: skip
    if "batch_vit_l" in reports:
        md += ["## Batch size", "", *batch_table(reports["batch_vit_l"]), ""]
    if sections:
        md += ["## Sections", "", "| section | exit | seconds | limit |", "| --- | --- | --- | --- |"]
        md += [f"| {s['section']} | {s['exit']} | {s['seconds']} | {s['limit'] or ''} |" for s in sections]
    return summary, "\n".join(md) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
    p.add_argument("--started", default="", help="when the check started (UTC)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--sections", default="", help="the sections that were asked for (comma list)")
    p.add_argument(
        "--suffix", default="", help="added to the results file's name (a run of some sections only)"
    )
    args = p.parse_args(argv)
    work, out = args.work, args.out
    summary, md = summarize(work)
    env = gpu_results._json(work / "env.json") or {}
    device = env.get("device") or next((r["device"] for r in summary["reports"].values()), "unknown")
    stem = f"{gpu_results.device_slug(device, args.dry_run)}-{args.date}{'-' + args.suffix if args.suffix else ''}"
    profile = work / "profile_vit_large.txt"
    if profile.is_file():
        shutil.copyfile(profile, out / f"{stem}-profile.txt")
    meta = {"date": args.date, "started_utc": args.started or None, "dry_run": args.dry_run, "budget_s": args.budget,
            "sections_requested": [s for s in args.sections.split(",") if s],
            "profile": f"{stem}-profile.txt" if profile.is_file() else None}  # fmt: skip
    (out / "summary.json").write_text(
        json.dumps(summary, indent=1)
    )  # first: the raw reports survive a bug below
    (out / "summary.md").write_text(md)
    results = gpu_results.build(work, meta)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    head = ["# GPU check", "", *gpu_results.render(results, f"{stem}.json"), ""]
    (out / "summary.md").write_text("\n".join(head) + md.removeprefix("# GPU check"))
    print(f"results file: {out / stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
