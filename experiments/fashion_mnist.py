"""Does MAE pretraining help? Fashion-MNIST study: pretrain once, then fine-tune and linear-probe from the
MAE encoder and from random initialisation at equal budget, for several label fractions and seeds.

    .venv/bin/python experiments/fashion_mnist.py [BUDGET.yaml]

Writes the table, the pretraining loss and k-NN curves and the reconstruction figure to the report
(default docs/results.md). Every run is an ordinary `mae` run directory under output_dir; finished
runs are skipped on a re-run.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SIZE = 60_000


def run(entry: str, recipe: str, out: Path, overrides: dict, log_dir: Path) -> float:
    """Run one entry point to completion (resuming if it was interrupted); returns wall seconds."""
    args = [f"recipe={recipe}", f"output_dir={out}"] + [f"{k}={v}" for k, v in overrides.items()]
    cmd = [sys.executable, str(ROOT / "mae" / f"{entry}.py"), *args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{out.name}.log"
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    with open(log, "a") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{entry} failed (exit {rc}); see {log}")
    return time.time() - t


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def final_top1(out: Path) -> float:
    evals = [r["top1"] for r in rows(out) if "top1" in r]
    if not evals:
        sys.exit(f"{out} has no evaluation row")
    return evals[-1]


def run_overrides(spec: dict, init: str, fraction: float, seed: int, pre: Path) -> dict:
    """One fine-tune / probe run. Equal budget: every run is one "epoch" of `samples_seen` images drawn from
    its labelled subset (seeded permutations of the subset, repeated as often as needed), so a 1% run and a
    100% run process the same number of images and take the same number of optimizer steps."""
    return {
        "seed": seed,
        "data.label_fraction": fraction,
        "data.epoch_samples": int(spec["samples_seen"]),
        "train.epochs": 1,
        "train.eval_every": 1,  # the one evaluation, at the end
        "model.init": str(pre) if init == "mae" else "",
        **(spec.get("overrides") or {}),
        **(spec.get(f"{init}_overrides") or {}),
    }


def plot_curves(pre: Path, fig_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = rows(pre)
    names = []
    train = [x for x in r if x.get("loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["epoch"] for x in train], [x["loss"] for x in train], lw=1)
    ax.set(xlabel="epoch", ylabel="reconstruction loss (masked patches, MSE)", title="MAE pretraining loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_dir / "pretrain_loss.png", dpi=120)
    names.append("pretrain_loss.png")
    knn = [x for x in r if "knn_top1" in x]
    if knn:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([x["epoch"] for x in knn], [x["knn_top1"] for x in knn], marker="o")
        ax.set(
            xlabel="epoch", ylabel="k-NN top-1 (%)", title="k-NN monitor on the test split during pretraining"
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(fig_dir / "pretrain_knn.png", dpi=120)
        names.append("pretrain_knn.png")
    plt.close("all")
    return names


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    budget_path = Path(argv[0]) if argv else ROOT / "experiments" / "fashion_mnist.yaml"
    b = yaml.safe_load(budget_path.read_text())
    root = ROOT / b["output_dir"]
    report = ROOT / b["report"]
    fig_dir = report.parent / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    t0 = time.time()
    timings: dict[str, float] = {}

    pre = root / "pretrain"
    timings["pretrain"] = run("pretrain", b["pretrain"]["recipe"], pre, b["pretrain"]["overrides"], logs)

    results: dict[tuple[str, str, float], list[float]] = {}
    for kind in ("finetune", "linprobe"):
        spec = b[kind]
        for fraction in b["label_fractions"]:
            for init in ("mae", "scratch"):
                for seed in b["seeds"]:
                    out = root / f"{kind}-{init}-{fraction:g}-seed{seed}"
                    overrides = run_overrides(spec, init, fraction, seed, pre)
                    timings[out.name] = run(kind, spec["recipe"], out, overrides, logs)
                    results.setdefault((kind, init, fraction), []).append(final_top1(out))
                    print(f"{out.name}: top-1 {results[(kind, init, fraction)][-1]:.2f}", flush=True)

    figures = plot_curves(pre, fig_dir)
    recon = pre / "reconstruction-last.png"
    if recon.is_file():
        shutil.copy(recon, fig_dir / "reconstruction.png")
        figures.append("reconstruction.png")
    wall = time.time() - t0
    (root / "timings.json").write_text(json.dumps(timings, indent=1))
    write_report(report, b, budget_path, results, figures, timings, wall, pre)
    print(f"wrote {report}")
    return 0


def write_report(
    report: Path,
    b: dict,
    budget_path: Path,
    results: dict,
    figures: list[str],
    timings: dict,
    wall: float,
    pre: Path,
) -> None:
    pre_rows = rows(pre)
    losses = [r["loss"] for r in pre_rows if "loss" in r]
    knn = [r["knn_top1"] for r in pre_rows if "knn_top1" in r]
    lines = [
        "# Fashion-MNIST: does MAE pretraining help?",
        "",
        "Top-1 (%) on the 10,000 Fashion-MNIST test images. *MAE*: the encoder pretrained with MAE on the 60,000",
        "training images without labels; *scratch*: the same architecture from random initialisation. Both get",
        "the same fine-tuning / probing budget (images processed), whatever the label fraction. "
        f"Seeds: {b['seeds']} (mean ± standard deviation where more than one).",
        "",
        "| labels | fine-tune MAE | fine-tune scratch | Δ | linear probe MAE | linear probe scratch | Δ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in b["label_fractions"]:
        ft_m, ft_s = results[("finetune", "mae", f)], results[("finetune", "scratch", f)]
        lp_m, lp_s = results[("linprobe", "mae", f)], results[("linprobe", "scratch", f)]
        d_ft = statistics.mean(ft_m) - statistics.mean(ft_s)
        d_lp = statistics.mean(lp_m) - statistics.mean(lp_s)
        lines.append(
            f"| {f * 100:g}% ({int(f * TRAIN_SIZE)}) | {fmt(ft_m)} | {fmt(ft_s)} | {d_ft:+.2f} | {fmt(lp_m)} | "
            f"{fmt(lp_s)} | {d_lp:+.2f} |"
        )
    lines += [
        "",
        "## Pretraining",
        "",
        f"Recipe `{b['pretrain']['recipe']}` with {b['pretrain']['overrides']}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (f"; k-NN top-1 on the test split {knn[0]:.1f}% -> {knn[-1]:.1f}%" if knn else "")
        + f"; {timings['pretrain'] / 60:.1f} min.",
        "",
    ]
    lines += [f"![{name}](results/{name})" for name in figures]
    lines += [
        "",
        "## Setup",
        "",
        f"- Hardware: {platform.processor() or platform.machine()}, {_cpu_count()} CPU cores, no GPU; bf16 autocast.",
        f"- Total wall time: {wall / 60:.1f} min (pretraining {timings['pretrain'] / 60:.1f} min).",
        f"- Budget file: `{budget_path.relative_to(ROOT) if budget_path.is_relative_to(ROOT) else budget_path}`; "
        f"fine-tuning {b['finetune']['samples_seen']} images per run (recipe `{b['finetune']['recipe']}`), linear "
        f"probing {b['linprobe']['samples_seen']} (recipe `{b['linprobe']['recipe']}`).",
        "- Command: `.venv/bin/python experiments/fashion_mnist.py`",
        "",
    ]
    report.write_text("\n".join(lines))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
