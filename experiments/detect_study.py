"""The pre-registered detection study of docs/detection.md: Mask R-CNN from the demo MAE encoder against the same
recipe from scratch (and a positive control, the encoder fine-tuned with labels) on the fashion-mnist-instances
scenes, at three label budgets, with each arm's lr chosen on held-out training scenes and 3 paired seeds; the test
scenes are read once per final run, after the selection. One command; re-running it resumes where it stopped.

    python experiments/detect_study.py                       # the study (hours on 2 CPU cores); resumes
    python experiments/detect_study.py --quick               # the same protocol on tiny budgets (a test runs it)
    python experiments/detect_study.py --report              # the table and the verdict of what has finished

Everything goes under --out (default runs/detect_study; --quick: runs/detect_study_quick): data/ (the scenes as COCO
datasets: training pools of each budget, the held-out validation scenes, the test scenes), the encoders it makes
when --mae / --control are not given, one run directory per (arm, budget, lr, seed) with test.json beside its
eval.json, selection.json, and report.md with the verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Protocol:
    """What the study runs; `FULL` is the pre-registered one (docs/detection.md)."""

    budgets: dict  # label budget -> training scenes (the first N of the pool: training scenes 0 .. pool - 1)
    pool: int  # training scenes that budgets draw from
    val: tuple[int, int]  # held-out training scenes (first, count): the selection's validation set
    test: int  # test scenes (fashion-mnist-instances:test), read once per final run
    lrs: tuple[float, ...]  # each arm's lr grid
    seeds: tuple[int, ...]  # paired seeds (data order, augmentation, new layers)
    cap: int  # the most optimizer steps a run may take; the pilot fixes `steps` at or below it
    every: int  # the pilot's validation interval (steps)
    batch: int
    steps: int = 0  # optimizer steps of every run: set by the pilot (`pilot`)
    select_budget: str = "10%"  # where each arm's lr is chosen (seed seeds[0])
    overrides: tuple[str, ...] = ()  # on top of recipe=detect_demo, for every run alike
    encoder_overrides: tuple[str, ...] = ()  # for the encoders the study makes itself
    arms: tuple[str, ...] = ("mae", "scratch", "control")
    gated: tuple[str, ...] = ("1%", "10%")  # the budgets the verdict reads
    order: tuple[str, ...] = field(default=("1%", "10%", "100%"))  # finals run budget by budget, gated first


FULL = Protocol(
    budgets={"1%": 200, "10%": 2000, "100%": 19000}, pool=19000, val=(19000, 500), test=1000,
    lrs=(1e-4, 3e-4, 1e-3), seeds=(0, 1, 2), cap=1000, every=100, batch=16,
)  # fmt: skip
QUICK = Protocol(
    budgets={"1%": 8, "10%": 16}, pool=32, val=(100, 8), test=8, lrs=(3e-4, 1e-3), seeds=(0, 1), cap=4, every=2,
    batch=4, overrides=("data.num_workers=0",), order=("1%", "10%"),
    encoder_overrides=("train.max_steps=2", "train.batch_size=32", "data.num_workers=0", "log.knn_every_steps=0",
                       "data.val=", "log.viz_images=0"),
)  # fmt: skip
PASS_GAIN, FAIL_GAIN = 3.0, 1.0  # box AP points (issue 35's criteria, read on box AP)
LEVELLED = (
    1.0  # the pilot: validation box AP rising by less than this over the next 2 intervals has levelled off
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# data and encoders


def prepare_data(out: Path, p: Protocol) -> dict[str, Path]:
    """The COCO datasets every run reads: train_<N> for each budget, val, test (written once)."""
    from experiments.detect_demo import write_scenes

    sets = {f"train_{n}": ("train", 0, n) for n in p.budgets.values()}
    sets.update(val=("train", *p.val), test=("test", 0, p.test))
    paths = {}
    for name, (split, first, count) in sets.items():
        path = out / "data" / name
        if not (path / "annotations.json").is_file():
            log(f"writing {count} {split} scenes from {first} to {path}")
            write_scenes(path, count, split, first)
        paths[name] = path
    return paths


def encoders(out: Path, p: Protocol, mae: str, control: str) -> dict[str, str]:
    """model.init of each arm: the MAE encoder (made with recipe=demo unless given), none, and the positive control
    (that encoder fine-tuned on Fashion-MNIST's labels with recipe=finetune_demo unless given)."""
    from mae.finetune import main as finetune
    from mae.pretrain import main as pretrain

    if not mae:
        mae = str(out / "encoders" / "demo")
        if pretrain(["recipe=demo", f"output_dir={mae}", *p.encoder_overrides]) != 0 or not _finished(mae):
            raise SystemExit("pretraining the MAE encoder failed or was stopped; re-run to resume")
    if not control:
        control = str(out / "encoders" / "finetune_demo")
        args = [o for o in p.encoder_overrides if not o.startswith(("log.knn", "log.viz"))]
        if finetune(
            ["recipe=finetune_demo", f"model.init={mae}", f"output_dir={control}", *args]
        ) != 0 or not _finished(control):
            raise SystemExit("fine-tuning the positive control failed or was stopped; re-run to resume")
    return {"mae": mae, "scratch": "", "control": control}


def _finished(run: str) -> bool:
    """Whether a run reached its last step (a stop signal ends a run with status 0 after a checkpoint)."""
    import yaml

    total = yaml.safe_load((Path(run) / "config.yaml").read_text())["derived"]["total_steps"]
    rows = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return bool(rows) and json.loads(rows[-1])["step"] == total


# ----------------------------------------------------------------------------------------------------------
# runs


def run_name(arm: str, budget: str, lr: float, seed: int) -> str:
    return f"{arm}_{budget.rstrip('%')}pct_lr{lr:g}_s{seed}"


def train(out: Path, p: Protocol, data: dict, init: dict, arm: str, budget: str, lr: float, seed: int,
          name: str = "", evals: int = 1) -> dict:  # fmt: skip
    """One run of recipe=detect_demo (resumed when it was cut short): p.steps steps, validated `evals` times
    evenly; its final validation row."""
    from mae.detect import main as detect

    run = out / "runs" / (name or run_name(arm, budget, lr, seed))
    if not _final_row(run, p.steps):
        log(f"training {run.name}")
        args = ["recipe=detect_demo", f"output_dir={run}", f"model.init={init[arm]}",
                f"data.train={data[f'train_{p.budgets[budget]}']}", f"data.val={data['val']}", f"seed={seed}",
                f"train.lr={lr:g}", f"train.batch_size={p.batch}", f"train.epochs={evals}",
                f"data.epoch_samples={p.steps // evals * p.batch}", "train.eval_every=1", "log.progress=false",
                f"checkpoint.every_steps={max(p.steps // 4, 1)}", *p.overrides]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()) as text:
            rc = detect(args)
        if run.is_dir():
            with open(run / "train.log", "a") as f:
                f.write(text.getvalue())
        if rc != 0:
            raise SystemExit(f"{run.name} exited {rc}; see {run / 'train.log'}")
        if not _final_row(run, p.steps):  # stopped by a signal after a checkpoint
            raise SystemExit(f"{run.name} stopped before its last step; re-run the same command to resume")
    return _final_row(run, p.steps)


def _final_row(run: Path, steps: int) -> dict | None:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    return next((r for r in rows if r["step"] == steps and "box_ap" in r), None)


def test_scores(run: Path, test: Path) -> dict:
    """The run's final weights scored once on the test scenes (test.json beside its eval.json)."""
    import torch

    from mae.data.detection import DetEvalLoader, det_source, det_transform
    from mae.eval.coco import coco_ap
    from mae.runs.record import task_run
    from mae.tasks.detect import detect_results
    from mae.train.runtime import resolve_precision
    from mae.weights.build import build_detector

    f = run / "test.json"
    if f.is_file():
        return json.loads(f.read_text())
    from safetensors.torch import load_file

    cfg, weights = task_run(run, "detect", "last")
    src = det_source(str(test), train=False, log_fn=lambda *a: None)
    model = build_detector(cfg, len(src.categories))
    model.load_state_dict(load_file(str(weights)))
    loader = DetEvalLoader(src, det_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, train=False),
                           in_chans=cfg.model.in_chans, batch_size=32, rank=0, world_size=1, workers=0)  # fmt: skip
    bf16 = resolve_precision(cfg.train.precision, False) == "bf16"

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    results, ids, _ = detect_results(model, loader, src, src.categories, torch.device("cpu"), autocast)
    scores = coco_ap(src.coco(), results, ids)
    scores = {k: v for k, v in scores.items() if k != "summary"}
    _write(f, {"weights": str(weights), **scores})
    return scores


def _write(path: Path, obj) -> None:
    """JSON written whole or not at all (a study stopped mid-write resumes cleanly)."""
    path.with_suffix(".tmp").write_text(json.dumps(obj, indent=1))
    path.with_suffix(".tmp").replace(path)


# ----------------------------------------------------------------------------------------------------------
# the protocol


def pilot(out: Path, p: Protocol, data: dict, init: dict) -> Protocol:
    """The steps of every run, fixed before the study: from scratch at the selection budget, the grid's middle lr,
    seed seeds[0], validated every p.every steps up to p.cap; the first validation after which box AP never rises
    by LEVELLED or more (p.cap when only the last one qualifies)."""
    q = replace(p, steps=p.cap)
    train(
        out,
        q,
        data,
        init,
        "scratch",
        p.select_budget,
        p.lrs[len(p.lrs) // 2],
        p.seeds[0],
        "pilot",
        p.cap // p.every,
    )
    rows = [json.loads(line) for line in (out / "runs" / "pilot" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["box_ap"]) for r in rows if "box_ap" in r]
    steps = next(s for i, (s, ap) in enumerate(curve) if all(a - ap < LEVELLED for _, a in curve[i + 1 :]))
    _write(out / "pilot.json", {"curve": curve, "steps": steps})
    log(f"pilot (scratch, {p.select_budget}): validation box AP {', '.join(f'{s}: {a:.2f}' for s, a in curve)}; "
        f"every run takes {steps} steps")  # fmt: skip
    return replace(p, steps=steps)


def select(out: Path, p: Protocol, data: dict, init: dict) -> dict[str, float]:
    """Each arm's lr: the best validation box AP at the selection budget, seed seeds[0] (ties: the smaller lr)."""
    chosen = {}
    for arm in p.arms:
        val = {lr: train(out, p, data, init, arm, p.select_budget, lr, p.seeds[0])["box_ap"] for lr in p.lrs}
        chosen[arm] = max(p.lrs, key=lambda lr: (val[lr], -lr))
        log(f"{arm}: validation box AP {', '.join(f'lr {lr:g} {v:.2f}' for lr, v in val.items())}: "
            f"lr {chosen[arm]:g}")  # fmt: skip
    _write(out / "selection.json", chosen)
    return chosen


def finals(out: Path, p: Protocol, data: dict, init: dict, lrs: dict) -> dict:
    """Test scores per (budget, arm, seed); the selection's runs are the seeds[0] runs of their budget."""
    scores: dict = {}
    for budget in p.order:
        for seed in p.seeds:
            for arm in p.arms:
                train(out, p, data, init, arm, budget, lrs[arm], seed)
                run = out / "runs" / run_name(arm, budget, lrs[arm], seed)
                scores.setdefault(budget, {}).setdefault(arm, {})[seed] = test_scores(run, data["test"])
    return scores


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def gains(scores: dict, budget: str, arm: str, key: str = "box_ap") -> list[float]:
    """Paired differences arm - scratch, one per seed."""
    s = scores[budget]
    return [s[arm][seed][key] - s["scratch"][seed][key] for seed in sorted(s["scratch"])]


def complete(scores: dict, budget: str, p: Protocol) -> bool:
    return budget in scores and all(len(scores[budget].get(a, {})) == len(p.seeds) for a in p.arms)


def verdict(scores: dict, p: Protocol) -> tuple[str, str] | None:
    """PASS / FAIL / INCONCLUSIVE by the pre-registered criteria on test box AP, and why; None while a budget it
    needs is unfinished. The 1% runs alone decide PASS, and INCONCLUSIVE when the positive control does not clear 3.0
    or MAE's mean gain is at least 1.0 (no 10% result can change either); only FAIL needs the 10% runs."""
    lo, mid = p.gated
    if not complete(scores, lo, p):
        return None
    g, c = gains(scores, lo, "mae"), gains(scores, lo, "control")
    (m, sd), (cm, _) = _mean_sd(g), _mean_sd(c)
    control_clears = cm >= PASS_GAIN
    why = (f"at {lo} labels MAE - scratch {m:+.2f} +- {sd:.2f} box AP (seeds {', '.join(f'{x:+.2f}' for x in g)}), "
           f"positive control - scratch {cm:+.2f}")  # fmt: skip
    if m >= PASS_GAIN and m >= 2 * sd and all(x > 0 for x in g) and control_clears:
        return "PASS", why
    if not control_clears:
        return "INCONCLUSIVE", why + (
            f"; the positive control does not clear {PASS_GAIN:.1f}: the protocol cannot tell at this budget, "
            f"whatever the {mid} runs give"
        )
    if m >= FAIL_GAIN:
        return "INCONCLUSIVE", why + f"; neither PASS nor FAIL holds, whatever the {mid} runs give"
    if not complete(scores, mid, p):
        return None
    m_mid = _mean_sd(gains(scores, mid, "mae"))[0]
    why += f"; at {mid} MAE - scratch {m_mid:+.2f}"
    if m_mid < FAIL_GAIN:
        return "FAIL", why
    return "INCONCLUSIVE", why


def report(scores: dict, lrs: dict, p: Protocol) -> str:
    lines = ["| labels | arm (lr) | test box AP | test mask AP | box AP - scratch (paired) |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for budget in p.order:
        if not complete(scores, budget, p):
            continue
        for arm in p.arms:
            box = _mean_sd([scores[budget][arm][s]["box_ap"] for s in p.seeds])
            mask = _mean_sd([scores[budget][arm][s]["mask_ap"] for s in p.seeds])
            gain = (
                "" if arm == "scratch" else "{:+.2f} +- {:.2f}".format(*_mean_sd(gains(scores, budget, arm)))
            )
            lines.append(f"| {budget} ({p.budgets[budget]:,}) | {arm} ({lrs[arm]:g}) | {box[0]:.2f} +- {box[1]:.2f} | "
                         f"{mask[0]:.2f} +- {mask[1]:.2f} | {gain} |")  # fmt: skip
    text = "\n".join(lines)
    decided = verdict(scores, p)
    if decided:
        text += "\n\nVerdict: **{}** ({}).".format(*decided)
    else:
        pending = [b for b in p.gated if not complete(scores, b, p)]
        text += f"\n\nVerdict: not yet (the {' and '.join(pending)} runs have not all finished)."
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same protocol on tiny budgets")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--mae", default="", help="the MAE encoder (a pretraining run); default: made with recipe=demo"
    )
    ap.add_argument("--control", default="", help="the positive control (a fine-tuning run); default: made")
    ap.add_argument("--report", action="store_true", help="only the table and verdict of what has finished")
    ap.add_argument("--until", choices=("pilot", "selection", "all"), default="all",
                    help="stop after this stage (the pilot: to time one run and size the study)")  # fmt: skip
    args = ap.parse_args(argv)
    p = QUICK if args.quick else FULL
    out = args.out or ROOT / "runs" / ("detect_study_quick" if args.quick else "detect_study")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = prepare_data(out, p)
    if args.report:
        lrs = json.loads((out / "selection.json").read_text())
        scores = {b: {a: {s: json.loads((out / "runs" / run_name(a, b, lrs[a], s) / "test.json").read_text())
                          for s in p.seeds if (out / "runs" / run_name(a, b, lrs[a], s) / "test.json").is_file()}
                      for a in p.arms} for b in p.order}  # fmt: skip
    else:
        init = encoders(out, p, args.mae, args.control)
        p = pilot(out, p, data, init)
        if args.until == "pilot":
            return 0
        lrs = select(out, p, data, init)
        if args.until == "selection":
            return 0
        scores = finals(out, p, data, init, lrs)
    text = report(scores, {k: float(v) for k, v in lrs.items()}, p)
    (out / "report.md").write_text(text + "\n")
    print(text)
    log(f"{time.time() - t0:.0f} s; {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
