"""The results file of one GPU check, and the docs' table generated from results files.

    python benchmarks/gpu_results.py benchmarks/results/h200-*.json     # rewrites the block in docs/performance.md
    python benchmarks/gpu_results.py FILE... --doc OTHER.md | --stdout

`build(work, meta)` folds the raw reports of benchmarks/gpu_check.sh (its WORK folder) into the results file,
`<device>-<YYYY-MM-DD>.json` (gpu_summary.py writes it). Every key of `KEYS` is there: a number or a struct
when it was measured, else null and its reason in `reasons`. Fractions are 0-1. `render` makes the markdown of
one results file; the command line puts the newest first between the markers of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = (
    "gemm_peak_tflops",
    "vit_large_default",
    "vit_base_default",
    "loop_vit_base_jpeg_device",
    "loop_vit_base_jpeg_cpu",
    "loop_vit_base_synthetic",
    "xformers",
    "reference_vit_base_img_s",
    "reference_vit_large_img_s",
    "batch_sweep",
    "segment_demo_img_s",
    "detect_demo_img_s",
    "detect_vit_base_1024",
    "embed_vit_base_img_s",
)
KEEP_RATIO = 1.02  # a lever is kept when `after` is at least 2% faster than `before`: beyond one run's noise
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
# lever -> (section, report, config fields that differ from the report's first row (a function of that row's
# config), what it is)
STEP_LEVERS = {
    "fused_adamw_capturable": ("step:vit_l", "step_vit_l", lambda c: {"optimizer": "fused-capturable"},
                               "recipe=vit_large compiled: fused AdamW -> fused AdamW with capturable state"),
    "vit_large_batch_x2": ("step:vit_l", "step_vit_l", lambda c: {"batch": 2 * c["batch"]},
                           "recipe=vit_large compiled: twice the images per GPU, effective batch and lr kept"),
    "masking_noise_on_device": ("step:vit_l", "step_vit_l", lambda c: {"noise": "host"},
                                "recipe=vit_large compiled: masking noise as the loop draws it (numpy + blocking "
                                "copy) -> drawn on the device"),
    "loss_in_compiled_graph": ("step:vit_b", "step_vit_b", lambda c: {"loss": "eager"},
                               "recipe=vit_base compiled: loss and norm_pix target after the compiled encoder + "
                               "decoder -> inside the compiled graph"),
}  # fmt: skip
# levers whose `after` is what runs today: the row that differs is their `before`
BEFORE_DIFFERS = ("masking_noise_on_device", "loss_in_compiled_graph")
LOOPS = {
    "loop_vit_base_jpeg_device": "device",
    "loop_vit_base_jpeg_cpu": "cpu",
    "loop_vit_base_synthetic": "synthetic",
}
CUDA_GRAPH_LOOP = "synthetic_reduce-overhead"


# ----------------------------------------------------------------------------------------------------------
# reading the raw reports


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_sections(work: Path) -> dict[str, dict]:
    """sections.txt ('label exit seconds limit' per line) -> {label: {exit, seconds, limit}}."""
    out = {}
    path = work / "sections.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        label, rc, seconds, *limit = line.split()
        out[label] = {"exit": rc, "seconds": int(seconds), "limit": int(limit[0]) if limit else None}
    return out


def read_notes(work: Path) -> dict[str, str]:
    """notes.txt ('label<TAB>why it did not run') -> {label: why}."""
    path = work / "notes.txt"
    lines = path.read_text().splitlines() if path.is_file() else []
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


class Reasons:
    """Why a key is null, from what its section did."""

    def __init__(self, sections: dict, notes: dict, requested: list[str]):
        self.sections, self.notes, self.requested = sections, notes, requested

    def __call__(self, label: str, fallback: str = "no result") -> str:
        if label in self.notes:
            return self.notes[label]
        s = self.sections.get(label)
        if s is None:
            name = label.split(":")[0]
            return f"section {name} was not run (SECTIONS={','.join(self.requested)})" if name not in self.requested \
                else fallback  # fmt: skip
        if s["exit"] == "skipped":
            return "skipped: the time budget was spent"
        if s["exit"] in ("124", "137"):
            return f"stopped at its {s['limit']} s limit before this was measured"
        if s["exit"] != "0":
            return f"{label} failed (exit {s['exit']}); see gpu_check.log"
        return fallback


def step_row(row: dict, report: dict) -> dict:
    c = row["config"]
    return {"img_s": row["img_per_s"], "mfu": row["mfu_measured"], "mfu_nominal": row.get("mfu_nominal"),
            "batch": c["batch"], "peak_gb": row["peak_mem_gb"], "tflops": row["tflops"], "step_ms": row["step_ms"],
            "warmup_s": row["warmup_s"], "dtype": c["dtype"], "attn": row["attn_used"],
            "compile": "off" if not c["compile"] else ("on" if c["compile_mode"] == "default" else c["compile_mode"]),
            "optimizer": c["optimizer"], "recipe": report.get("recipe", ""), "model": report["model"]}  # fmt: skip


def find_row(report: dict, base: dict, differ: dict) -> dict | None:
    """The first row whose config equals `base`'s except for the fields of `differ`, which take its values."""
    want = {**base["config"], **differ}
    for row in report["results"]:
        c = {**{"loss": "graph", "noise": "device"}, **row["config"]}
        if all(c.get(k) == v for k, v in want.items()):
            return row
    return None


def windows(run: Path) -> list[dict]:
    """The timed metrics.jsonl rows of a training run, the first window (compilation, start-up) left out when
    there are more."""
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    rows = [r for r in rows if "img_per_s" in r]
    return rows[1:] if len(rows) > 1 else rows


def loop_run(run: Path) -> dict | None:
    """img/s and data wait (medians over the windows) of one run of the training loop, with its settings."""
    rows = windows(run)
    if not rows:
        return None
    out = {"img_s": statistics.median(r["img_per_s"] for r in rows),
           "data_wait": statistics.median(r["data_wait"] for r in rows), "windows": [r["img_per_s"] for r in rows]}  # fmt: skip
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        c = yaml.safe_load(cfg.read_text())
        out.update(batch=c["train"]["batch_size"], workers=c["data"]["num_workers"], decode=c["data"]["decode"],
                   compile=str(c["train"]["compile"]), precision=c["train"]["precision"])  # fmt: skip
    return out


def _lr_rule(batch: int, gpus: int = 8, effective: int = 4096) -> dict:
    """What recipe=vit_large derives at `batch` per GPU on `gpus` GPUs with grad_accum keeping `effective`."""
    try:
        from mae.config import derive
        from mae.tasks import load_config

        accum = effective // (batch * gpus)
        cfg = load_config(["recipe=vit_large", f"train.batch_size={batch}", f"train.grad_accum={accum}"])
        d = derive(cfg, world_size=gpus, loader_steps_per_epoch=10**6)
    except Exception as e:  # noqa: BLE001  an annotation of the lever: its failure must not lose the results file
        return {"batch": batch, "error": f"{type(e).__name__}: {e}"}
    return {
        "batch": batch,
        "grad_accum": accum,
        "gpus": gpus,
        "effective_batch": d.effective_batch,
        "lr": d.lr,
    }


def lever(
    before: dict | None, after: dict | None, what: str, why_missing: str, **extra
) -> tuple[dict | None, str]:
    if before is None or after is None:
        return None, why_missing
    ratio = after["img_s"] / before["img_s"]
    return {"what": what, "before_img_s": before["img_s"], "after_img_s": after["img_s"], "ratio": ratio,
            "verdict": "kept" if ratio >= KEEP_RATIO else "dropped", **extra}, ""  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# the results file


def device_slug(name: str, dry_run: bool) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'; the dry run is 'dryrun'."""
    if dry_run:
        return "dryrun"
    m = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu").lower()


def build(work: Path, meta: dict) -> dict:
    """The results file from WORK (see gpu_check.sh) and `meta` (date, dry_run, budget_s, sections requested)."""
    sections, notes = read_sections(work), read_notes(work)
    why = Reasons(sections, notes, meta.get("sections_requested", []))
    env = _json(work / "env.json") or {}
    res: dict = {"schema": 1, "date": meta["date"], "started_utc": meta.get("started_utc"),
                 "device": env.get("device"), "torch": env.get("torch"), "cuda": env.get("cuda"),
                 "driver": env.get("driver"), "dry_run": bool(meta.get("dry_run")), "budget_s": meta.get("budget_s"),
                 "sections": [{"section": k, **v} for k, v in sections.items()], "profile": meta.get("profile"),
                 "levers": {}}  # fmt: skip
    reasons: dict[str, str] = {}

    def put(key: str, value, reason: str) -> None:
        res[key] = value
        if value is None:
            reasons[key] = reason

    reports = {k: _json(work / f"{k}.json") for k in ("step_vit_l", "step_vit_b", "batch_vit_l", "reference_vit_b",
                                                     "reference_vit_l", "tune_vit_l")}  # fmt: skip
    # the GEMM peak of the run's dtype, the best of every report of this run
    dtype = next((r["results"][0]["config"]["dtype"] for r in reports.values() if r and r["results"]), None)
    peaks = [
        r["matmul_peak_tflops"][dtype] for r in reports.values() if r and dtype in r["matmul_peak_tflops"]
    ]
    put("gemm_peak_tflops", max(peaks) if peaks else None, why("step:vit_l"))
    res["gemm_dtype"] = dtype
    if res["profile"] is None:
        reasons["profile"] = why("step:vit_l")

    defaults = {}
    for key, rep, label in (("vit_large_default", "step_vit_l", "step:vit_l"),
                            ("vit_base_default", "step_vit_b", "step:vit_b")):  # fmt: skip
        report = reports[rep]
        first = report["results"][0] if report and report["results"] else None
        if first is not None and not first["error"]:
            defaults[rep] = first
            put(key, step_row(first, report), "")
        else:
            put(key, None, first["error"] if first else why(label))

    for name, (label, rep, differ, what) in STEP_LEVERS.items():
        base, report = defaults.get(rep), reports[rep]
        other = find_row(report, base, differ(base["config"])) if base else None
        if other is not None and other["error"]:
            res["levers"][name], reasons[f"levers.{name}"] = None, other["error"]
            continue
        rows = (step_row(other, report) if other else None, step_row(base, report) if base else None)
        if name not in BEFORE_DIFFERS:
            rows = rows[::-1]
        extra = {}
        if name == "vit_large_batch_x2" and all(rows):
            extra = {"peak_gb": [rows[0]["peak_gb"], rows[1]["peak_gb"]],
                     "lr_rule": [_lr_rule(rows[0]["batch"]), _lr_rule(rows[1]["batch"])]}  # fmt: skip
        value, reason = lever(*rows, what, why(label), **extra)
        res["levers"][name] = value
        if value is None:
            reasons[f"levers.{name}"] = reason

    loop_work = work / "loop_work"
    step = res.get("vit_base_default")
    for key, mode in LOOPS.items():
        run = loop_run(loop_work / f"run_{mode}")
        if run is not None:
            same = step is not None and step["batch"] == run.get("batch")
            run["step_img_s"] = step["img_s"] if same else None
            run["frac_of_step"] = run["img_s"] / step["img_s"] if same else None
            if not same:
                run["frac_reason"] = "no compiled vit_base step at the loop's batch: " + (
                    reasons.get("vit_base_default")
                    or f"step batch {step['batch']}, loop batch {run.get('batch')}"
                )
        put(key, run, why("loop", f"the loop run '{mode}' logged no timed window (log in summary.json)"))
    graphs = loop_run(loop_work / f"run_{CUDA_GRAPH_LOOP}")
    ran = [r.get("compile") for r in (res["loop_vit_base_synthetic"], graphs) if r]  # train.compile as run
    value, reason = lever(res["loop_vit_base_synthetic"], graphs,
                          "the real loop (mae/pretrain.py recipe=vit_base, synthetic data): train.compile default -> "
                          "reduce-overhead (CUDA graphs)", why("loop", "the reduce-overhead loop run logged no timed window"),
                          train_compile=ran)  # fmt: skip
    res["levers"]["cuda_graphs_in_loop"] = value
    if value is None:
        reasons["levers.cuda_graphs_in_loop"] = reason

    for key, pair, label in (("xformers", "xformers_pair", "xformers:pair"),
                             ("xformers_device_torch", "xformers_device", "xformers:device")):  # fmt: skip
        x = _json(work / f"{pair}.json")
        put(key, x, why(label))

    for key, rep, label in (("reference_vit_base_img_s", "reference_vit_b", "ref:vit_b"),
                            ("reference_vit_large_img_s", "reference_vit_l", "ref:vit_l")):  # fmt: skip
        report = reports[rep]
        rows = {r["side"]: r for r in report["results"] if not r["error"]} if report else {}
        ref = next((r for side, r in rows.items() if side.startswith("reference")), None)
        ours = rows.get("this project")
        put(key, ref["img_per_s"] if ref else None, why(label))
        if ref:
            res.setdefault("reference", {})[label.split(":")[1]] = {
                "batch": ref["config"]["batch"], "compile": "off", "reference_img_s": ref["img_per_s"],
                "ours_img_s": ours["img_per_s"] if ours else None}  # fmt: skip

    sweep = reports["batch_vit_l"]
    if sweep and sweep["results"]:
        rows = [{"batch": r["config"]["batch"], "error": r["error"]} if r["error"] else
                {"batch": r["config"]["batch"], "img_s": r["img_per_s"], "peak_gb": r["peak_mem_gb"],
                 "mfu": r["mfu_measured"]} for r in sweep["results"]]  # fmt: skip
        fits = [r["batch"] for r in rows if "img_s" in r]
        put("batch_sweep", {"model": sweep["model"], "compile": "off", "rows": rows,
                            "largest_fit": max(fits) if fits else None, "largest_tried": max(r["batch"] for r in rows),
                            "all_fit": len(fits) == len(rows)}, "")  # fmt: skip
    else:
        put("batch_sweep", None, why("batch"))

    seg = windows(work / "segment_demo")
    put("segment_demo_img_s", statistics.median(r["img_per_s"] for r in seg) if seg else None,
        why("segment", "mae/segment.py logged no img_per_s window"))  # fmt: skip
    det = windows(work / "detect_demo")
    put("detect_demo_img_s", statistics.median(r["img_per_s"] for r in det) if det else None,
        why("detect", "mae/detect.py logged no img_per_s window"))  # fmt: skip
    put("detect_vit_base_1024", detect_vit_b(_json(work / "detect_vit_b.json")),
        why("detect", "benchmarks/detect_bench.py wrote no result"))  # fmt: skip
    emb = _json(work / "embed.json")
    ok = emb and emb.get("exit") == 0 and emb.get("seconds", 0) > 0
    put("embed_vit_base_img_s", emb["images"] / emb["seconds"] if ok else None,
        why("embed", f"python -m mae.embed exited {emb.get('exit')}" if emb else "no result"))  # fmt: skip
    if ok:
        res["embed_vit_base"] = emb
    res["reasons"] = reasons
    return res


def detect_vit_b(report: dict | None) -> dict | None:
    """ViT-B/16 Mask R-CNN, window 14 against global attention: img/s and peak GB per batch, GB per image (the
    difference of the peaks at the two batches); None when no configuration ran."""
    if not report:
        return None
    out = {}
    for attn in ("window 14", "global"):
        rows = sorted((r for r in report["results"] if r["name"] == f"vit_b {attn}" and "peak_gb" in r),
                      key=lambda r: r["batch"])  # fmt: skip
        if rows:
            per = ((rows[-1]["peak_gb"] - rows[0]["peak_gb"]) / (rows[-1]["batch"] - rows[0]["batch"])
                   if len(rows) > 1 else None)  # fmt: skip
            out[attn.split()[0]] = {"img_s": rows[-1]["img_per_s"], "batch": rows[-1]["batch"],
                                    "peak_gb": rows[-1]["peak_gb"], "gb_per_image": per}  # fmt: skip
    return out or None


def missing_keys(res: dict) -> list[str]:
    """Required keys that are absent, or null without a reason: [] for a well-formed results file."""
    return [k for k in KEYS if k not in res or (res[k] is None and not res["reasons"].get(k))]


# ----------------------------------------------------------------------------------------------------------
# markdown


def _n(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _sci(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def _xformers_cells(x: dict) -> str:
    """'img/s | ran its own kernel, which ops, dispatched operators, differences to SDPA, error |'."""
    ops = f" ({', '.join(x['xformers_ops'])})" if x.get("xformers_ops") else ""
    d = x.get("dispatched") or {}
    picked = f"; dispatched {d['forward']} / {d['backward']}" if "forward" in d else ""
    return (f"{_n(x.get('img_s'))} | ran its own kernel: {'yes' if x.get('ran_kernel') else 'no'}{ops}{picked}; "
            f"loss rel. diff {_sci(x.get('loss_rel_diff'))}, grad rel. diff {_sci(x.get('grad_rel_diff'))}"
            f"{'; SDPA ' + _n(x['sdpa_img_s']) + ' img/s' if x.get('sdpa_img_s') else ''}"
            f"{'; ' + x['error'] if x.get('error') else ''} |")  # fmt: skip


def render(res: dict, name: str) -> list[str]:
    """The markdown of one results file: headline table, levers, batch sweep."""
    why = res["reasons"]
    na = lambda key: f"— ({why.get(key, 'no result')})"  # noqa: E731
    gemm = res["gemm_peak_tflops"]
    title = f"{res['device'] or 'device ?'}, torch {res['torch'] or '?'}, {res['date']}"
    lines = [f"#### `{name}`: {title}{' (dry run: tiny models on the CPU)' if res['dry_run'] else ''}", "",
             f"Same-run GEMM peak ({res.get('gemm_dtype') or '?'}): "
             + (f"{gemm:,.1f} TFLOP/s" if gemm is not None else na("gemm_peak_tflops"))
             + "; MFU is against it.", "", "| measure | img/s | detail |", "| --- | --- | --- |"]  # fmt: skip
    for key, label in (("vit_large_default", "ViT-L/16, recipe=vit_large as run"),
                       ("vit_base_default", "ViT-B/16, recipe=vit_base as run")):  # fmt: skip
        r = res[key]
        lines.append(f"| {label} | {na(key)} | |" if r is None else
                     f"| {label} | {_n(r['img_s'])} | batch {r['batch']}, compile {r['compile']}, {r['dtype']}: "
                     f"MFU {_pct(r['mfu'])}, peak {r['peak_gb']:.1f} GB |")  # fmt: skip
    for key, label in (("loop_vit_base_jpeg_device", "loop, ViT-B, JPEG decoded on the device"),
                       ("loop_vit_base_jpeg_cpu", "loop, ViT-B, JPEG decoded by the workers"),
                       ("loop_vit_base_synthetic", "loop, ViT-B, synthetic data")):  # fmt: skip
        r = res[key]
        if r is None:
            lines.append(f"| {label} | {na(key)} | |")
            continue
        frac = _pct(r["frac_of_step"]) if r["frac_of_step"] is not None else f"— ({r.get('frac_reason', '')})"
        lines.append(f"| {label} | {_n(r['img_s'])} | {frac} of the compiled step, data wait {_pct(r['data_wait'])}"
                     f"{', batch ' + str(r['batch']) + ', ' + str(r['workers']) + ' workers' if 'batch' in r else ''} |")  # fmt: skip
    for key, size in (("reference_vit_base_img_s", "vit_b"), ("reference_vit_large_img_s", "vit_l")):
        r = res.get("reference", {}).get(size)
        label = f"reference release, {'ViT-B' if size == 'vit_b' else 'ViT-L'}/16, eager"
        lines.append(f"| {label} | {na(key)} | |" if r is None else
                     f"| {label} | {_n(r['reference_img_s'])} | batch {r['batch']}; this project in the same run "
                     f"{_n(r['ours_img_s'])}" + (f" ({r['ours_img_s'] / r['reference_img_s']:.2f}x)" if r['ours_img_s'] else "") + " |")  # fmt: skip
    x = res["xformers"]
    lines.append(
        "| xformers (pinned pair) | " + (na("xformers") + " | |" if x is None else _xformers_cells(x))
    )
    xd = res.get("xformers_device_torch")
    if xd:
        which = (
            "xformers (does not import)" if xd.get("xformers", "?") == "?" else f"xformers {xd['xformers']}"
        )
        lines.append(f"| {which} on the machine's torch {xd.get('torch', '?')} | {_xformers_cells(xd)}")
    for attn, r in (res.get("detect_vit_base_1024") or {}).items():
        per = "" if r["gb_per_image"] is None else f"; {r['gb_per_image']:.2f} GB per image"
        lines.append(f"| Mask R-CNN ViT-B/16 1024 px, {attn} attention | {_n(r['img_s'], 1)} | batch {r['batch']}, "
                     f"peak {r['peak_gb']:.1f} GB{per} |")  # fmt: skip
    if res.get("detect_vit_base_1024") is None:
        lines.append(f"| Mask R-CNN ViT-B/16 1024 px | {na('detect_vit_base_1024')} | |")
    for key, label in (("segment_demo_img_s", "mae/segment.py recipe=segment_demo"),
                       ("detect_demo_img_s", "mae/detect.py recipe=detect_demo"),
                       ("embed_vit_base_img_s", "python -m mae.embed, ViT-B/16")):  # fmt: skip
        v = res.get(key)
        lines.append(f"| {label} | {na(key) if v is None else _n(v)} | "
                     f"{'wall time, start-up included' if key.startswith('embed') and v is not None else ''} |")  # fmt: skip
    lines += ["", f"Levers (img/s before -> after, kept when at least {KEEP_RATIO - 1:.0%} faster):", "",
              "| lever | before -> after | ratio | verdict |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name_, lv in res["levers"].items():
        if lv is None:
            lines.append(f"| {name_} | — ({why.get('levers.' + name_, 'no result')}) | | |")
        else:
            lines.append(f"| {lv['what']} | {_n(lv['before_img_s'])} -> {_n(lv['after_img_s'])} | "
                         f"{lv['ratio']:.3f} | {lv['verdict']} |")  # fmt: skip
    sweep = res["batch_sweep"]
    lines.append("")
    if sweep is None:
        lines.append(f"Batch sweep: {na('batch_sweep')}")
    else:
        cells = [f"{r['batch']}: {_n(r['img_s'])} img/s, {r['peak_gb']:.1f} GB" if "img_s" in r else
                 f"{r['batch']}: {r['error']}" for r in sweep["rows"]]  # fmt: skip
        fit = sweep["largest_fit"]
        lines.append(f"Batch sweep ({sweep['model']}, eager): " + "; ".join(cells) + ". Largest that fits: "
                     + ("none" if fit is None else f"{fit}{' (all tried fit; larger may)' if sweep['all_fit'] else ''}")
                     + ".")  # fmt: skip
    return lines


def write_doc(files: list[Path], doc: Path | None) -> str:
    """The block for `files` (the newest run first); replaces the text between the markers of `doc` when given."""
    runs = [(f, json.loads(f.read_text())) for f in files]
    for f, res in runs:
        if not isinstance(res, dict) or (missing := missing_keys(res)):
            raise SystemExit(
                f"{f}: not a results file, or keys missing or null without a reason: {', '.join(missing)}"
            )
    runs.sort(key=lambda fr: (fr[1]["date"], fr[1].get("started_utc") or ""), reverse=True)
    blocks = []
    for f, res in runs:
        blocks += [*render(res, f.name), ""]
    if not blocks:
        blocks = ["No GPU run has written a results file yet (benchmarks/results/<device>-<date>.json).", ""]
    text = "\n".join([BEGIN, "", *blocks, END])
    if doc is not None:
        old = doc.read_text()
        if BEGIN not in old or END not in old:
            raise SystemExit(f"{doc}: no {BEGIN} ... {END} block to rewrite")
        head, rest = old.split(BEGIN, 1)
        doc.write_text(head + text + rest.split(END, 1)[1])
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "files", nargs="*", type=Path, help="results files (benchmarks/results/<device>-<date>.json)"
    )
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    p.add_argument("--stdout", action="store_true", help="print the block instead of rewriting --doc")
    args = p.parse_args(argv)
    text = write_doc(args.files, None if args.stdout else args.doc)
    if args.stdout:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
