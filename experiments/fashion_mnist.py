"""Does MAE pretraining help? Fashion-MNIST study: pretrain once, then fine-tune and linear-probe from the
MAE encoder and from random initialisation at equal budget, for several label fractions and seeds.

    .venv/bin/python experiments/fashion_mnist.py [BUDGET.yaml] [KEY=VALUE ...]

Writes the table, the pretraining loss and k-NN curves and the reconstruction figure to the report
(default docs/results.md). Every run is an ordinary `mae` run directory under output_dir; finished
runs are skipped on a re-run. KEY=VALUE arguments are run settings passed to every run that leave the
results alone (loader workers, torch.compile, logging), e.g. `data.num_workers=8 train.compile=false` on a
GPU machine; they are not part of the budget, so runs made with other settings still count as finished.
Each run's machine is recorded next to its wall time and named in the report.
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

if not __package__:  # run as a script: `experiments` is importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.feature_probes import probes  # noqa: E402
from experiments.pixel_baselines import baselines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SIZE = 60_000
RUN_SETTINGS = ("data.num_workers", "train.compile", "log.wandb", "log.progress")  # leave the results alone
NAMES = {"finetune": "fine-tuning", "linprobe": "linear probing"}


def run(
    entry: str, recipe: str, out: Path, overrides: dict, log_dir: Path, settings: dict | None = None
) -> float | None:
    """Run one entry point to completion (resuming if it was interrupted); returns wall seconds, or None
    when the run had already finished with these overrides. `settings` (RUN_SETTINGS) go to the run too,
    but are not checked against a finished run."""
    if finished(out, overrides):
        return None
    args = [f"recipe={recipe}", f"output_dir={out}"]
    args += [f"{k}={v}" for k, v in {**overrides, **(settings or {})}.items()]
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


def finished(out: Path, overrides: dict) -> bool:
    """True when `out` holds a complete run made with `overrides`; a run made with other settings is an
    error (resuming it would mix two budgets)."""
    if not (out / "config.yaml").is_file():
        return False
    saved = same_budget(out, overrides)
    r = rows(out)
    total = saved.get("derived", {}).get("total_steps")
    return bool(r) and r[-1].get("step") == total and ("top1" in r[-1] or "loss" in r[-1])


def same_budget(out: Path, overrides: dict) -> dict:
    """The saved config of the run in `out`; exits naming the key when it was made with other `overrides`."""
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key, want in overrides.items():
        have = saved
        for part in key.split("."):
            have = have.get(part) if isinstance(have, dict) else None
        if str(have) != str(want) and not _same_number(have, want) and not _same_init(key, have, want):
            sys.exit(
                f"{out} was run with {key}={have!r} but the budget now says {want!r}: "
                "move it away (or change output_dir) to run the study with the new budget"
            )
    return saved


def _same_init(key: str, a, b) -> bool:
    """model.init given relative to the repository root or absolute names the same checkpoint."""
    return (
        key == "model.init" and bool(a) and bool(b) and (ROOT / str(a)).resolve() == (ROOT / str(b)).resolve()
    )


def _same_number(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def final_top1(out: Path) -> float:
    evals = [r["top1"] for r in rows(out) if "top1" in r]
    if not evals:
        sys.exit(f"{out} has no evaluation row")
    return evals[-1]


def run_overrides(
    spec: dict, init: str, fraction: float, seed: int, pre: Path, blr: float | None = None
) -> dict:
    """One fine-tune / probe run. Equal budget: every run is one "epoch" of `samples_seen` images drawn from
    its labelled subset (seeded permutations of the subset, repeated as often as needed), so at a label
    fraction the MAE and the from-scratch runs, whatever their lr, process the same number of images and take
    the same number of optimizer steps."""
    return {
        "seed": seed,
        "data.label_fraction": fraction,
        "data.epoch_samples": samples_seen(spec, fraction),
        "train.epochs": 1,
        "train.eval_every": 1,  # the one evaluation, at the end
        "model.init": str(pre.relative_to(ROOT) if pre.is_relative_to(ROOT) else pre)
        if init == "mae"
        else "",
        **(spec.get("overrides") or {}),
        **(spec.get(f"{init}_overrides") or {}),
        **({"train.blr": blr} if blr is not None else {}),
    }


def samples_seen(spec: dict, fraction: float) -> int:
    """Images per run at `fraction`: `samples_seen` is one number for every fraction, or a mapping
    {fraction: images} (a 1% subset is learnt in fewer images than the whole training set)."""
    per = spec["samples_seen"]
    if not isinstance(per, dict):
        return int(per)
    for key, value in per.items():
        if float(key) == float(fraction):
            return int(value)
    sys.exit(f"samples_seen has no entry for label fraction {fraction:g}: give one per label fraction")


def plot_curves(pre: Path, fig_dir: Path, pixel_knn: float) -> list[str]:
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
        ax.plot([x["epoch"] for x in knn], [x["knn_top1"] for x in knn], marker="o", label="MAE encoder")
        ax.axhline(pixel_knn, color="grey", ls="--", label=f"raw pixels ({pixel_knn:.1f}%)")
        ax.legend(loc="lower right")
        ax.set(xlabel="epoch", ylabel="k-NN top-1 (%)", title="k-NN monitor during pretraining (test images)")
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


def parse_args(argv: list[str]) -> tuple[Path, dict]:
    """[BUDGET.yaml] [KEY=VALUE ...] -> (budget path, run settings); a usage error exits with code 2."""
    budget_path, settings = ROOT / "experiments" / "fashion_mnist.yaml", {}
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0)
    for i, arg in enumerate(argv):
        if i == 0 and "=" not in arg:
            budget_path = Path(arg)
            if not budget_path.is_file():
                _usage(f"budget file {arg!r} does not exist")
            continue
        key, sep, value = arg.partition("=")
        if not sep or not value:
            _usage(f"expected KEY=VALUE after the budget file, got {arg!r}")
        if key not in RUN_SETTINGS:
            _usage(
                f"{key} is not a run setting ({', '.join(RUN_SETTINGS)}); what changes the results belongs in the "
                "budget file"
            )
        settings[key] = value
    return budget_path, settings


def _usage(message: str) -> None:
    print(f"usage: fashion_mnist.py [BUDGET.yaml] [KEY=VALUE ...]\nerror: {message}", file=sys.stderr)
    sys.exit(2)


def machine() -> str:
    """Where the runs started now execute: the GPU the recipes pick when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (1 GPU, {_cpu_count()} CPU cores)"
    return f"{_cpu_name()}, {_cpu_count()} CPU cores, no GPU"


def main(argv: list[str] | None = None) -> int:
    budget_path, settings = parse_args(sys.argv[1:] if argv is None else argv)
    b = yaml.safe_load(budget_path.read_text())
    root = ROOT / b["output_dir"]
    report = ROOT / b["report"]
    fig_dir = report.parent / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    timings_path = root / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    machines_path = root / "machines.json"
    machines: dict[str, str] = json.loads(machines_path.read_text()) if machines_path.is_file() else {}
    here = machine()

    def timed(name: str, seconds: float | None) -> None:
        if seconds is not None:  # a run finished earlier keeps the time it took then, and its machine
            timings[name], machines[name] = round(seconds, 1), here
            timings_path.parent.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=1))
            machines_path.write_text(json.dumps(machines, indent=1))

    pre = root / "pretrain"
    timed(
        "pretrain", run("pretrain", b["pretrain"]["recipe"], pre, b["pretrain"]["overrides"], logs, settings)
    )

    # results[(kind, init, fraction)][blr or None] = top-1 of each seed
    results: dict[tuple[str, str, float], dict[float | None, list[float]]] = {}
    for kind in ("finetune", "linprobe"):
        spec = b[kind]
        for fraction in b["label_fractions"]:
            for init in ("mae", "scratch"):
                sweep = spec.get(f"{init}_blr") or [None]
                for blr in sweep:
                    for seed in b["seeds"]:
                        tag = f"-blr{blr:g}" if blr is not None else ""
                        out = root / f"{kind}-{init}{tag}-{fraction:g}-seed{seed}"
                        overrides = run_overrides(spec, init, fraction, seed, pre, blr)
                        timed(out.name, run(kind, spec["recipe"], out, overrides, logs, settings))
                        top1 = final_top1(out)
                        results.setdefault((kind, init, fraction), {}).setdefault(blr, []).append(top1)
                        print(f"{out.name}: top-1 {top1:.2f}", flush=True)

    pixels_path = root / "pixel_baselines.json"
    if not pixels_path.is_file():  # a few minutes, once: the rows every other number reads against
        t = time.time()
        log_cfg = yaml.safe_load((pre / "config.yaml").read_text())["log"]
        base = baselines(b["label_fractions"], log_cfg["knn_train_samples"], log_cfg["knn_val_samples"])
        pixels_path.write_text(json.dumps(base, indent=1))
        timed("pixel_baselines", time.time() - t)
    pixels = json.loads(pixels_path.read_text())
    probes_path = root / "feature_probes.json"
    if not probes_path.is_file():  # a few minutes, once: which block of the encoder separates the classes
        t = time.time()
        probes_path.write_text(json.dumps(probes(pre, b["label_fractions"]), indent=1))
        timed("feature_probes", time.time() - t)
    feats = json.loads(probes_path.read_text())

    figures = plot_curves(pre, fig_dir, pixels["knn_monitor"])
    recon = pre / "reconstruction-last.png"
    if recon.is_file():
        shutil.copy(recon, fig_dir / "reconstruction.png")
        figures.append("reconstruction.png")
    write_report(report, b, budget_path, results, pixels, feats, figures, timings, pre, machines)
    print(f"wrote {report}")
    return 0


def _budget_words(b: dict) -> str:
    """'fine-tuning 30,000 / 60,000 / 240,000 images at 1% / 10% / 100% labels, linear probing 30,000'."""
    fractions = " / ".join(f"{f * 100:g}%" for f in b["label_fractions"])
    per = {k: [samples_seen(b[k], f) for f in b["label_fractions"]] for k in ("finetune", "linprobe")}

    def words(n: list[int]) -> str:
        return (
            f"{n[0]:,}"
            if len(set(n)) == 1
            else f"{' / '.join(f'{x:,}' for x in n)} images at {fractions} labels"
        )

    if per["finetune"] == per["linprobe"]:
        return f"fine-tuning and linear probing alike {words(per['finetune'])}"
    return ", ".join(f"{NAMES[k]} {words(n)}" for k, n in per.items())


def best_blr(by_blr: dict) -> float | None:
    """The swept lr with the highest mean top-1 over seeds (None when there was no sweep)."""
    return max(by_blr, key=lambda blr: statistics.mean(by_blr[blr]))


def write_report(
    report: Path,
    b: dict,
    budget_path: Path,
    results: dict,
    pixels: dict,
    feats: dict,
    figures: list[str],
    timings: dict,
    pre: Path,
    machines: dict | None = None,
) -> None:
    pre_rows = rows(pre)
    losses = [r["loss"] for r in pre_rows if "loss" in r]
    knn = [r["knn_top1"] for r in pre_rows if "knn_top1" in r]
    swept = [k for k in ("finetune", "linprobe") if b[k].get("scratch_blr")]
    lines = [
        "# Fashion-MNIST: does MAE pretraining help?",
        "",
        "Top-1 (%) on the 10,000 Fashion-MNIST test images. *MAE*: the encoder pretrained with MAE on the 60,000",
        "training images without labels; *scratch*: the same architecture from random initialisation. Every",
        "fine-tune / probe at a label fraction processes the same number of images, MAE or scratch, whatever "
        f"its lr ({_budget_words(b)}). "
        + (
            f"Seeds {b['seeds']}: mean ± standard deviation over seeds (the labelled subset is the same for every seed)."
            if len(b["seeds"]) > 1
            else f"One seed ({b['seeds'][0]}) per run."
        ),
    ]
    if swept:
        lines += [
            "",
            "From scratch, "
            + " and ".join(NAMES[k] for k in swept)
            + (" gets" if len(swept) == 1 else " get")
            + " a small learning-rate sweep; the table shows the best lr per label fraction (chosen on the test "
            "images, which favours the baseline). The MAE runs use the recipe's lr.",
        ]
    lines += [
        "",
        "| labels | fine-tune MAE | fine-tune scratch | Δ | linear probe MAE | linear probe scratch | Δ |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in b["label_fractions"]:
        cells = []
        for kind in ("finetune", "linprobe"):
            mae, scratch = results[(kind, "mae", f)], results[(kind, "scratch", f)]
            m, s_blr = mae[best_blr(mae)], best_blr(scratch)
            s = scratch[s_blr]
            tag = f" (blr {s_blr:g})" if s_blr is not None and len(scratch) > 1 else ""
            cells += [fmt(m), fmt(s) + tag, f"{statistics.mean(m) - statistics.mean(s):+.2f}"]
        lines.append(f"| {f * 100:g}% ({int(f * TRAIN_SIZE)}) | " + " | ".join(cells) + " |")
    lines += pixel_rows(b["label_fractions"], pixels)
    lines += against_pixels(b["label_fractions"], results, pixels, knn)
    lines += probe_rows(b["label_fractions"], pixels, feats)
    for kind in swept:
        sweep = b[kind]["scratch_blr"]
        lines += [
            "",
            f"{NAMES[kind].capitalize()} from scratch, every lr of the sweep:",
            "",
            "| labels | " + " | ".join(f"blr {x:g}" for x in sweep) + " |",
            "| --- | " + " | ".join("---" for _ in sweep) + " |",
        ]
        for f in b["label_fractions"]:
            by = results[(kind, "scratch", f)]
            lines.append(f"| {f * 100:g}% | " + " | ".join(fmt(by[x]) for x in sweep) + " |")
    total = sum(timings.values())
    lines += [
        "",
        "## Pretraining",
        "",
        f"Recipe `{b['pretrain']['recipe']}` with "
        + " ".join(f"`{k}={v}`" for k, v in b["pretrain"]["overrides"].items())
        + " (60,000 images, no labels): "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (
            f"; k-NN top-1 {knn[0]:.1f}% after the first epoch, {knn[-1]:.1f}% at the end ({_knn_setup(pre)}; "
            f"the same k-NN on the raw pixels: {pixels['knn_monitor']:.1f}%)"
            if knn
            else ""
        )
        + f"; {timings.get('pretrain', 0) / 60:.1f} min"
        + (f" on {machines['pretrain']}." if (machines or {}).get("pretrain") else "."),
        "",
    ]
    lines += [f"![{name}](results/{name})" for name in figures]
    lines += [
        "",
        "## Setup",
        "",
        f"- Compute time: {total / 60:.1f} min in all, bf16 autocast:",
        *machine_lines(timings, machines or {}),
        f"- Budget file: `{budget_path.relative_to(ROOT) if budget_path.is_relative_to(ROOT) else budget_path}`; "
        f"recipes `{b['finetune']['recipe']}` and `{b['linprobe']['recipe']}`"
        + "".join(
            f"; {NAMES[k]} with " + " ".join(f"`{key}={v}`" for key, v in b[k]["overrides"].items())
            for k in ("finetune", "linprobe")
            if b[k].get("overrides")
        )
        + ".",
        "- Command: `.venv/bin/python experiments/fashion_mnist.py` (every run is an ordinary run directory "
        f"under `{b['output_dir']}/`, with its `config.yaml`, `metrics.jsonl` and log).",
        "",
    ]
    report.write_text("\n".join(lines))


def machine_lines(timings: dict, machines: dict) -> list[str]:
    """One line per machine: its minutes and what ran there (runs kept from an earlier study keep theirs)."""
    by: dict[str, list[str]] = {}
    for name in timings:
        by.setdefault(machines.get(name, "machine not recorded"), []).append(name)
    lines = []
    for where, names in by.items():
        runs = sum(n.startswith(("finetune-", "linprobe-")) for n in names)
        parts = (["pretraining"] if "pretrain" in names else []) + (
            [f"{runs} fine-tune / probe run{'s' if runs != 1 else ''}"] if runs else []
        )
        parts += [label for key, label in (("pixel_baselines", "the pixel baselines"),
                                           ("feature_probes", "the feature probes")) if key in names]  # fmt: skip
        what = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        lines.append(f"  - {where}: {sum(timings[n] for n in names) / 60:.1f} min ({what}).")
    return lines


def pixel_rows(fractions: list[float], pixels: dict) -> list[str]:
    """The context table: the same labelled subsets and test images, classified from the raw pixels."""
    lines = [
        "",
        "No learning at all, for context: the same labelled subsets and test images, classified from the "
        "normalised pixels (logistic regression with the best L2 penalty of a small sweep, chosen on the test "
        "images; 20-NN with the k-NN monitor's cosine weighting):",
        "",
        "| labels | linear classifier on pixels | 20-NN on pixels |",
        "| --- | --- | --- |",
    ]
    for f in fractions:
        lin, knn, l2 = pixels["linear"][str(f)], pixels["knn"][str(f)], pixels["linear_l2"][str(f)]
        lines.append(f"| {f * 100:g}% ({int(f * TRAIN_SIZE)}) | {lin:.2f} (L2 {l2:g}) | {knn:.2f} |")
    return lines


def against_pixels(fractions: list[float], results: dict, pixels: dict, knn: list[float]) -> list[str]:
    """One generated sentence: every MAE number of the table minus its raw-pixel counterpart."""

    def mean(kind: str, f: float) -> float:
        by = results[(kind, "mae", f)]
        return statistics.mean(by[best_blr(by)])

    labels = " / ".join(f"{f * 100:g}%" for f in fractions)
    ft = " / ".join(
        f"{mean('finetune', f) - max(pixels['linear'][str(f)], pixels['knn'][str(f)]):+.2f}"
        for f in fractions
    )
    lp = " / ".join(f"{mean('linprobe', f) - pixels['linear'][str(f)]:+.2f}" for f in fractions)
    end = (
        f"; the encoder's k-NN in the monitor's setup ends at {knn[-1]:.1f}% against the pixels' "
        f"{pixels['knn_monitor']:.1f}% ({knn[-1] - pixels['knn_monitor']:+.1f})"
        if knn
        else ""
    )
    return [
        "",
        f"Against the pixels, at {labels} labels: the MAE fine-tune minus the better of the two pixel classifiers "
        f"is {ft} points; the MAE linear probe minus the linear classifier on pixels is {lp} points{end}.",
    ]


def probe_rows(fractions: list[float], pixels: dict, feats: dict) -> list[str]:
    """Block by block: the frozen MAE encoder's features under the pixel baselines' own classifiers, then the
    last block's read-outs of a randomly initialised encoder (`feats["random"]`, when measured)."""
    head = (
        " | ".join(f"linear {f * 100:g}%" for f in fractions)
        + " | "
        + " | ".join(f"20-NN {f * 100:g}%" for f in fractions)
    )
    random = feats.get("random")
    lines = [
        "",
        "The frozen MAE encoder's features under exactly these two classifiers (the same subsets, L2 sweep and "
        "test images; features standardised with the labelled subset's statistics), block by block: the cls "
        "token and the mean of the patch tokens after each block, and the last block's cls token after the "
        "final norm, which is what the linear-probe runs above train on"
        + (
            "; the last block's patch tokens after the final norm are also read as a small feature map (their "
            "mean over each cell of a 3x3 grid of patches, laid out like the pixels)"
            if "final/grid" in feats["linear"]
            else ""
        )
        + ". The best feature of each column is in bold."
        + (
            " Below them, the 20-NN of the last block's read-outs of a randomly initialised encoder of the same "
            "architecture: what each read-out gives without any learning."
            if random
            else ""
        ),
        "",
        f"| features | {head} |",
        "| --- | " + " | ".join("---" for _ in range(2 * len(fractions))) + " |",
        "| raw pixels | "
        + " | ".join(f"{pixels['linear'][str(f)]:.2f}" for f in fractions)
        + " | "
        + " | ".join(f"{pixels['knn'][str(f)]:.2f}" for f in fractions)
        + " |",
    ]
    names = list(feats["linear"])
    best = {
        (kind, f): max(names, key=lambda n: feats[kind][n][str(f)])
        for kind in ("linear", "knn")
        for f in fractions
    }
    for prefix, table in [("", feats)] + ([("random init: ", random)] if random else []):
        for name in table["knn"]:
            cells = []
            for kind in ("linear", "knn"):
                for f in fractions:
                    if name not in table.get(kind, {}):
                        cells.append("—")
                        continue
                    v = f"{table[kind][name][str(f)]:.2f}"
                    cells.append(f"**{v}**" if table is feats and best[(kind, f)] == name else v)
            lines.append(f"| {prefix}{_feature_label(name)} | " + " | ".join(cells) + " |")
    if "final/grid" in feats["knn"]:
        lines += ["", _grid_sentence(fractions, pixels, feats)]
    return lines


def _feature_label(name: str) -> str:
    return {
        "final/cls": "last block, cls after the final norm",
        "final/grid": "last block, patch tokens after the final norm on a 3x3 grid",
    }.get(name, name.replace("/", ", "))


def _grid_sentence(fractions: list[float], pixels: dict, feats: dict) -> str:
    """The 20-NN of the last block's 3x3 token grid against the pixels' 20-NN (and a random encoder's)."""
    labels = " / ".join(f"{f * 100:g}%" for f in fractions)
    mae = [feats["knn"]["final/grid"][str(f)] for f in fractions]
    pix = [pixels["knn"][str(f)] for f in fractions]
    text = (
        f"Read as a 3x3 grid, the pretrained encoder's last-block tokens under the pixels' own 20-NN reach "
        f"{' / '.join(f'{m:.2f}' for m in mae)} at {labels} labels, "
        f"{' / '.join(f'{m - p:+.2f}' for m, p in zip(mae, pix))} points against the pixels"
    )
    random = (feats.get("random") or {}).get("knn", {}).get("final/grid")
    if random:
        rnd = [random[str(f)] for f in fractions]
        text += (
            f", and {' / '.join(f'{m - r:+.2f}' for m, r in zip(mae, rnd))} against the same read-out of the "
            "randomly initialised encoder"
        )
    return text + "."


def _knn_setup(pre: Path) -> str:
    log = yaml.safe_load((pre / "config.yaml").read_text())["log"]
    return (
        f"{log['knn_k']}-NN on the encoder's mean patch features: {log['knn_train_samples']:,} labelled "
        f"training images as the memory bank, {log['knn_val_samples']:,} test images as queries"
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
