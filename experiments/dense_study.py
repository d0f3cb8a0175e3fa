"""Does MAE pretraining help dense prediction here? The pre-registered study of docs/segmentation.md.

    .venv/bin/python experiments/dense_study.py                  # the whole study: hours on 2 CPU cores
    .venv/bin/python experiments/dense_study.py --quick          # the same code at tiny budgets: minutes
    .venv/bin/python experiments/dense_study.py --pilot          # the pilot alone: the run length it fixes
    .venv/bin/python experiments/dense_study.py --doc docs/segmentation.md   # also write the table there

In order: the pilot that fixes the run length (scratch, 10% labels, constant lr, validation every 250 steps);
the MAE encoder pretrained on the training scenes, the positive control (a Fashion-MNIST classifier) and the
demo encoder; each arm's (mae, scratch, control) lr from the grid at 10% labels, seed 0, on the validation
scenes; every label budget (1%, 10%, 100%) and seed (0, 1, 2) at the arm's selected lr; the frozen-encoder probe (block chosen on
validation); the demo's position table (recompute against resample); the small-set check of the recipe;
then, once every run is done, the test scenes, read once by each final run; the verdict.

Each run is an ordinary run directory of the toolkit's own commands (`mae/pretrain.py`, `mae/finetune.py`,
`mae/segment.py`, called in this process with their argv; each one's output in OUT/logs/NAME.log) under
OUT/runs/; a finished run is skipped and an interrupted one resumes when the command is run again, so a
killed study goes on where it stopped. Results: OUT/results.json and OUT/results.md (the table); `--doc`
writes the table between the `dense_study` markers of a document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if not __package__:  # run as a script: `experiments` is importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.dense_report import finish, knn_of_encoders, write_doc  # noqa: E402
from experiments.fashion_mnist import rows, same_budget  # noqa: E402

SCENES = "fashion-mnist-scenes"
ARMS = ("mae", "scratch", "control")
FINETUNE_TOKENS = 197  # a 56 px scene in patches of 4: 14 x 14 patches and the cls token
RECIPE_BATCH = 16  # recipes/segment_demo.yaml's train.batch_size
PRETRAIN_TOKENS = 50  # the same scene in pretraining: 49 visible patches (mask ratio 0.75) and the cls token


@dataclass(frozen=True)
class Plan:
    """Every number of the study (docs/segmentation.md, "Its segmentation instance")."""

    budgets: dict = field(default_factory=lambda: {"1%": 200, "10%": 2000, "100%": 19000})
    labelled: int = 19000  # training scenes 0 .. labelled - 1 may be labelled; the rest is validation
    val: str = f"{SCENES}:train[19000:20000]"
    test: str = f"{SCENES}:test"
    seeds: tuple = (0, 1, 2)
    lrs: tuple = (2.5e-4, 1e-3, 4e-3)
    select_budget: str = "10%"  # each arm's lr is chosen here (seed 0) and serves every budget
    batch: int = 16
    warmup: int = 50
    pilot_steps: int = 4000
    pilot_every: int = 250
    pilot_lr: float = 4e-3  # the recipe's
    level_off: float = 1.0  # mIoU points: the pilot's length is where it never rises more after
    pretrain_scenes: int = 20000
    pretrain: dict = field(default_factory=dict)  # recipe=demo at 56 px on the scenes, as it is
    classifier: dict = field(default_factory=lambda: {"train.epochs": 5, "data.epoch_samples": 60000})
    demo_encoder: dict = field(default_factory=dict)  # recipe=demo as it is
    probe_blocks: tuple = (1, 2, 3, 4, 5, 6)
    probe_budget: str = "10%"
    small_set: tuple = (600, 300)  # scenes, steps
    knn: tuple = (10000, 10000)  # bank (training garments), queries (test garments)
    extra: dict = field(default_factory=dict)  # tiny sizes for --quick, given to every run
    segment_extra: dict = field(default_factory=dict)

    def budget_range(self, budget: str, seed: int) -> str:
        """The labelled subset of `budget` for `seed`: its own block below 100%, all of them at 100%."""
        n = self.budgets[budget]
        start = 0 if n >= self.labelled else seed * n
        return f"{SCENES}:train[{start}:{start + n}]"


FULL = Plan()
QUICK = replace(
    FULL,
    budgets={"1%": 4, "10%": 8, "100%": 24},
    labelled=24,
    val=f"{SCENES}:train[24:32]",
    test=f"{SCENES}:test[0:16]",
    seeds=(0, 1),
    lrs=(1e-3, 4e-3),
    batch=4,
    warmup=1,
    pilot_steps=2,
    pilot_every=1,
    pretrain_scenes=32,
    pretrain={"train.batch_size": 16},
    classifier={"train.max_steps": 2, "data.epoch_samples": 32, "train.batch_size": 16, "data.val": ""},
    demo_encoder={
        "train.max_steps": 2,
        "train.batch_size": 16,
        "data.epoch_samples": 32,
        "log.knn_every_steps": 0,
        "data.val": "",
    },  # fmt: skip
    probe_blocks=(1, 2),
    small_set=(8, 2),
    knn=(64, 32),
    extra={"model.depth": 2, "model.embed_dim": 32, "model.num_heads": 2, "data.num_workers": 0},
    segment_extra={"model.seg_channels": 8},
)


class Study:
    """The runs of one study directory: each started (or resumed) once, skipped when finished."""

    def __init__(self, out: Path, plan: Plan):
        self.out, self.plan = out, plan
        self.times_path = out / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}

    def run(self, task: str, recipe: str, name: str, overrides: dict) -> Path:
        """Run `task`'s command (mae/<task>.py) to completion in OUT/runs/NAME; returns the run directory."""
        out = self.out / "runs" / name
        overrides = {**self.plan.extra, **overrides}
        if finished(out, overrides):
            return out
        argv = [f"recipe={recipe}", f"output_dir={out}", *(f"{k}={v}" for k, v in overrides.items())]
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"{time.strftime('%H:%M:%S')} {task} {name}", flush=True)
        wall, cpu = time.time(), _cpu_seconds()
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"$ python mae/{task}.py {' '.join(argv)}", flush=True)
            rc = _entry(task)(argv)
        if rc != 0 or not finished(out, overrides):
            sys.exit(f"{name}: mae/{task}.py stopped (exit {rc}) before its last step; see {log}; run the "
                     "study again to resume it")  # fmt: skip
        self.times[name] = {"wall_s": round(time.time() - wall, 1), "cpu_s": round(_cpu_seconds() - cpu, 1)}
        self.times_path.write_text(json.dumps(self.times, indent=1))
        return out

    def segment(
        self, name: str, steps: int, lr: float, data: str, seed: int, init: str = "", **extra
    ) -> Path:
        """One fine-tune (or probe) of recipes/segment_demo.yaml: `steps` steps of the plan's batch at peak lr
        `lr`, poly schedule, one evaluation on the validation scenes at the end."""
        p = self.plan
        overrides = {
            "seed": seed,
            "model.init": init,
            "data.train": data,
            "data.val": p.val,
            "data.epoch_samples": steps * p.batch,  # one epoch: the evaluation comes at the end
            "train.epochs": 1,
            "train.max_steps": steps,
            "train.batch_size": p.batch,
            "train.warmup_steps": p.warmup,
            "train.blr": lr * 256 / p.batch,
            "train.eval_every": 1,
            "checkpoint.every_steps": 500,
            "log.every_steps": 50,
            **(p.segment_extra if extra.get("model.seg_head", "upernet") == "upernet" else {}),
            **extra,
        }
        return self.run("segment", "segment_demo", name, overrides)


def _entry(task: str):
    """The `main(argv)` of a command: what `python mae/<task>.py` runs."""
    from importlib import import_module

    return import_module(f"mae.{task}").main


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (data loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def finished(out: Path, overrides: dict) -> bool:
    """A complete run made with `overrides` (another budget in the same directory is an error): its last
    optimizer step logged and, for segmentation, evaluated."""
    if not (out / "config.yaml").is_file():
        return False
    saved = same_budget(out, overrides)
    total = saved.get("derived", {}).get("total_steps")
    r = rows(out)
    done = any(x.get("step") == total and "loss" in x for x in r)
    return done and (saved.get("task") != "segment" or any(x.get("step") == total and "miou" in x for x in r))


def last_eval(out: Path) -> dict:
    """The final validation evaluation of a segmentation run: mIoU, mAcc, aAcc and whether it collapsed."""
    e = [x for x in rows(out) if "miou" in x][-1]
    report = json.loads((out / "eval.json").read_text())
    return {k: round(e[k], 3) for k in ("miou", "macc", "aacc")} | {"collapsed": report.get("collapsed")}


# ----------------------------------------------------------------------------------------------------------
# the stages


def pilot(study: Study) -> dict:
    """Scratch at 10% labels, the recipe's lr held constant after warm-up, validation every pilot_every steps:
    the run length is the first evaluated step after which validation mIoU never rises more than level_off."""
    p = study.plan
    out = study.segment(
        "pilot_scratch_10pct", p.pilot_steps, p.pilot_lr, p.budget_range("10%", 0), 0,
        **{"data.epoch_samples": p.pilot_every * p.batch, "train.epochs": p.pilot_steps // p.pilot_every,
           "train.min_lr": p.pilot_lr},
    )  # fmt: skip
    curve = [(x["step"], round(x["miou"], 3)) for x in rows(out) if "miou" in x]
    return {"curve": curve, "steps": run_length(curve, p.level_off)}


def run_length(curve: list[tuple[int, float]], tolerance: float) -> int:
    """The first evaluated step of `curve` ((step, mIoU), in order) after which mIoU never rises by more than
    `tolerance` points: where it has levelled off."""
    return next(s for i, (s, m) in enumerate(curve) if all(later - m <= tolerance for _, later in curve[i:]))


def encoders(study: Study, steps: int) -> dict:
    """The MAE encoder (pretrained on the training scenes' images for at least one fine-tune's encoder token
    passes), the positive control (a classifier trained with labels) and the demo encoder (28 px)."""
    from experiments.segment_demo import write_scenes

    p = study.plan
    images = study.out / "scenes" / "images"
    if not images.is_dir() or len(list(images.glob("*.png"))) != p.pretrain_scenes:
        write_scenes(study.out / "scenes", p.pretrain_scenes, "train")
    need = steps * p.batch * FINETUNE_TOKENS
    epochs = math.ceil(need / (p.pretrain_scenes * PRETRAIN_TOKENS))
    mae = study.run("pretrain", "demo", "mae_encoder", {
        "model.img_size": 56, "data.train": str(images), "data.val": "", "log.knn_every_steps": 0,
        "model.norm_pix_loss": True, "model.decoder_depth": 4, "train.epochs": epochs,
        "checkpoint.every_steps": 200, **p.pretrain,
    })  # fmt: skip
    control = study.run("finetune", "finetune_demo", "control_classifier", dict(p.classifier))
    demo = study.run("pretrain", "demo", "demo_encoder", dict(p.demo_encoder))
    return {
        "mae": str(mae), "control": str(control), "demo": str(demo), "pretrain_epochs": epochs,
        "pretrain_token_passes": epochs * p.pretrain_scenes * PRETRAIN_TOKENS, "finetune_token_passes": need,
    }  # fmt: skip


def select(study: Study, steps: int, enc: dict) -> dict:
    """Each arm's lr: the grid at seed 0 on the selection budget, scored on the validation scenes."""
    p, out = study.plan, {}
    for arm, init in inits(enc).items():
        val = {}
        for lr in p.lrs:
            run = study.segment(
                run_name(arm, p.select_budget, lr, 0), steps, lr, p.budget_range(p.select_budget, 0), 0, init
            )
            val[lr] = last_eval(run)["miou"]
        best = max(val, key=lambda lr: (val[lr], -lr))  # a tie goes to the lower lr
        out[arm] = {"val_by_lr": {f"{k:g}": v for k, v in val.items()}, "lr": best}
    return out


def arms(study: Study, steps: int, enc: dict, chosen: dict) -> dict:
    """Each arm x budget x seed at the arm's selected lr, seed by seed with the arms side by side (the
    selection's seed-0 runs are those of their budget)."""
    p, cells = study.plan, {}
    for budget in p.budgets:
        for seed in p.seeds:
            for arm, init in inits(enc).items():
                lr = chosen[arm]["lr"]
                study.segment(
                    run_name(arm, budget, lr, seed), steps, lr, p.budget_range(budget, seed), seed, init
                )
        for arm in ARMS:
            lr = chosen[arm]["lr"]
            cells.setdefault(arm, {})[budget] = {
                "lr": lr,
                "runs": [run_name(arm, budget, lr, s) for s in p.seeds],
            }
            if budget == p.select_budget:
                cells[arm][budget]["val_by_lr"] = chosen[arm]["val_by_lr"]
    return cells


def inits(enc: dict) -> dict:
    """Each arm's `model.init`: the MAE encoder, none (scratch), the positive control."""
    return {"mae": enc["mae"], "scratch": "", "control": enc["control"]}


def run_name(arm: str, budget: str, lr: float, seed: int) -> str:
    return f"{arm}_{budget.replace('%', 'pct')}_lr{lr:g}_s{seed}"


def probes(study: Study, steps: int, enc: dict) -> dict:
    """The linear head on one block of a frozen encoder (MAE, random), the block chosen on validation."""
    p, out = study.plan, {}
    for encoder, init in (("mae", enc["mae"]), ("random", "")):
        val = {b: last_eval(probe(study, steps, encoder, init, b, 0))["miou"] for b in p.probe_blocks}
        best = max(val, key=lambda b: (val[b], -b))
        runs = [probe(study, steps, encoder, init, best, seed).name for seed in p.seeds]
        out[encoder] = {"val_by_block": val, "block": best, "runs": runs}
    return out


def probe(study: Study, steps: int, encoder: str, init: str, block: int, seed: int) -> Path:
    """A linear head on block `block` of the frozen encoder, at the recipe's lr and the probe's budget."""
    p = study.plan
    frozen = {"model.seg_head": "linear", "train.freeze_encoder": True, "model.seg_blocks": f"[{block}]"}
    data = p.budget_range(p.probe_budget, seed)
    return study.segment(
        f"probe_{encoder}_block{block}_s{seed}", steps, FULL.pilot_lr, data, seed, init, **frozen
    )


def position_table(study: Study, steps: int, enc: dict, lr: float) -> dict:
    """The demo encoder (28 px) into the 56 px scenes: its sin-cos table recomputed or resampled."""
    p, out = study.plan, {}
    for mode in ("recompute", "resample"):
        runs = [
            study.segment(f"pos_{mode}_s{s}", steps, lr, p.budget_range("10%", s), s, enc["demo"],
                          **{"model.pos_embed_adapt": mode}).name
            for s in p.seeds
        ]  # fmt: skip
        out[mode] = {"runs": runs, "val": [last_eval(study.out / "runs" / r)["miou"] for r in runs]}
    mean = {m: sum(v["val"]) / len(v["val"]) for m, v in out.items()}
    return out | {"chosen": "resample" if mean["resample"] > mean["recompute"] else "recompute"}


def small_set(study: Study, enc: dict, lr: float) -> dict:
    """The recipe's lr on a small labelled set: a few hundred scenes and steps, MAE and scratch: collapsed?"""
    (n, steps), out = study.plan.small_set, {}
    for arm, init in (("mae", enc["mae"]), ("scratch", "")):
        run = study.segment(f"small_{arm}", steps, lr, f"{SCENES}:train[0:{n}]", 0, init)
        out[arm] = {"run": run.name, **last_eval(run)}
    return out


def test_scores(study: Study, names: list[str]) -> dict:
    """Each named run's final weights on the test scenes, once: OUT/runs/NAME/test/eval.json (kept)."""
    import torch
    from accelerate import Accelerator
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from mae.runs.record import task_run
    from mae.tasks.segment import seg_evaluator
    from mae.weights.build import build_segmenter

    scores = {}
    for name in names:
        run = study.out / "runs" / name
        report = run / "test" / "eval.json"
        if not report.is_file():
            cfg, weights = task_run(run, "segment", "last")  # the final weights and their config
            OmegaConf.update(cfg, "data.val", study.plan.test)
            OmegaConf.update(cfg, "output_dir", str(run / "test"))
            (run / "test").mkdir(exist_ok=True)
            model = build_segmenter(cfg, 11)
            model.load_state_dict(load_file(str(weights)))
            with torch.no_grad():
                seg_evaluator(cfg, Accelerator(cpu=True), 11, log=lambda *a: None)(model, cfg.train.max_steps)
        r = json.loads(report.read_text())
        scores[name] = {k: round(r[k], 3) for k in ("miou", "macc", "aacc")} | {"collapsed": r["collapsed"]}
    return scores


# ----------------------------------------------------------------------------------------------------------


def study_main(out: Path, plan: Plan, doc: Path | None) -> dict:
    study = Study(out, plan)
    results: dict = {"plan": asdict(plan), "quick": plan is QUICK}
    results["pilot"] = pilot(study)
    steps = results["pilot"]["steps"]
    print(f"run length fixed by the pilot: {steps} steps", flush=True)
    enc = results["encoders"] = encoders(study, steps)
    results["knn"] = knn_of_encoders(enc, plan.knn, out / "knn.json")
    chosen = results["selection"] = select(study, steps, enc)
    cells = results["arms"] = arms(study, steps, enc, chosen)
    results["probe"] = probes(study, steps, enc)
    pos = results["position_table"] = position_table(study, steps, enc, chosen["mae"]["lr"])
    results["small_set"] = small_set(study, enc, chosen["mae"]["lr"])
    finals = [r for arm in cells.values() for c in arm.values() for r in c["runs"]]
    finals += [r for e in results["probe"].values() for r in e["runs"]]
    finals += [r for m in ("recompute", "resample") for r in pos[m]["runs"]]
    results["test"] = test_scores(study, finals)  # the test scenes: read once, after every run is done
    results["times"] = study.times
    results["recipe"] = {
        "train.blr": chosen["mae"]["lr"] * 256 / RECIPE_BATCH, "train.max_steps": steps,
        "model.pos_embed_adapt": pos["chosen"], "learns_on_a_small_set": not any(
            v["collapsed"] for v in results["small_set"].values()),
    }  # fmt: skip
    table = finish(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table)
    if doc is not None:
        write_doc(doc, table)
    print(table)
    print(f"verdict: {results['verdict']['word']}; results: {out / 'results.json'}, {out / 'results.md'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, the same code: minutes")
    ap.add_argument("--out", type=Path, help="study directory (default: runs/dense_study[_quick] here)")
    ap.add_argument("--doc", type=Path, help="write the table between the dense_study markers of this file")
    ap.add_argument(
        "--pilot", action="store_true", help="run the pilot alone and print the run length it fixes"
    )
    args = ap.parse_args(argv)
    out = args.out or Path("runs") / ("dense_study_quick" if args.quick else "dense_study")
    if args.doc is not None and not args.doc.is_file():
        print(f"error: --doc {args.doc}: no such file", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    if args.pilot:
        result = pilot(Study(out, plan))
        print(f"pilot (validation mIoU by step): {result['curve']}\nrun length: {result['steps']} steps")
        return 0
    study_main(out, plan, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
