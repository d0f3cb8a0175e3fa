"""The dense-prediction study's numbers (experiments/dense_study.py): the encoders' k-NN, the paired statistics,
the pre-registered verdict and the table of docs/segmentation.md, all from the study's results."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

BEGIN, END = "<!-- dense_study:begin -->", "<!-- dense_study:end -->"
GAIN, NULL, SPREAD = (
    3.0,
    1.0,
    2.0,
)  # the criteria, in mIoU points and standard deviations (docs/segmentation.md)
MEAN, STD = 0.2860, 0.3530  # the scenes' normalisation (recipes/segment_demo.yaml)


# ----------------------------------------------------------------------------------------------------------
# k-NN of the encoders


def centred_garments(split: str, count: int, size: int = 56):
    """(images (N, 1, size, size) normalised, labels (N,)): the split's first `count` Fashion-MNIST garments,
    each in the middle of a blank canvas of the scenes' size."""
    import torch

    from mae.data.sources import read_fashion_mnist

    garments, labels = read_fashion_mnist(None, split)
    at = (size - garments.shape[1]) // 2
    canvas = torch.zeros(count, 1, size, size)
    canvas[:, 0, at : at + garments.shape[1], at : at + garments.shape[2]] = torch.tensor(garments[:count])
    return (canvas / 255 - MEAN) / STD, torch.tensor(labels[:count])


def knn_of_encoders(enc: dict, sizes: tuple[int, int], cache: Path) -> dict:
    """k-NN top-1 (%, k 20: the pretraining monitor's) of the mean patch token for garments centred on a 56 px
    canvas, `sizes` = (training garments in the bank, test garments as queries), for the MAE encoder, the
    positive control and a random encoder of the same architecture. Kept in `cache`."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch
    import torch.nn.functional as F

    from mae.eval.metrics import knn_top1
    from mae.models import VisionTransformer
    from mae.weights.encoder import Embedder, load_encoder

    quiet = lambda *a: None  # noqa: E731
    mae, spec = load_encoder(enc["mae"], img_size=56, log=quiet)
    torch.manual_seed(0)
    random = VisionTransformer(
        img_size=56, patch_size=mae.patch_embed.patch_size, in_chans=1, num_classes=0, global_pool=False,
        embed_dim=mae.embed_dim, depth=mae.depth, num_heads=mae.blocks[0].attn.num_heads,
    )  # fmt: skip
    encoders = {
        "mae": mae,
        "control": load_encoder(enc["control"], img_size=56, log=quiet)[0],
        "random": random,
    }
    (bank_x, bank_y), (query_x, query_y) = (
        centred_garments("train", sizes[0]),
        centred_garments("test", sizes[1]),
    )
    out = {}
    for name, model in encoders.items():
        embed = Embedder(model, spec, pool="mean", device="cpu")
        bank, queries = (F.normalize(torch.cat([embed(x[i : i + 500]) for i in range(0, len(x), 500)]), dim=1)
                         for x in (bank_x, query_x))  # fmt: skip
        out[name] = round(knn_top1(bank, bank_y, queries, query_y, k=20), 2)
    cache.write_text(json.dumps(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# statistics and the verdict


def spread(values: list[float]) -> dict:
    """Mean and standard deviation (n - 1) of a list of scores."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired(arm: list[float], scratch: list[float]) -> dict:
    """Seed-by-seed differences arm - scratch: their values, mean, sd and whether every one is positive."""
    diffs = [a - s for a, s in zip(arm, scratch)]
    return {"diffs": diffs, **spread(diffs), "all_positive": all(d > 0 for d in diffs)}


def clears(gain: dict) -> bool:
    """The PASS conditions on one paired gain: mean >= 3.0, at least twice its sd, every seed positive."""
    return gain["mean"] >= GAIN and gain["mean"] >= SPREAD * gain["sd"] and gain["all_positive"]


def verdict(gains: dict) -> dict:
    """PASS / FAIL / INCONCLUSIVE by the pre-registered criteria; `gains[arm][budget]` = paired(...)."""
    mae1, mae10, ctl1 = gains["mae"]["1%"], gains["mae"]["10%"], gains["control"]["1%"]
    control = f"the positive control's gain at 1% is {ctl1['mean']:+.2f} (sd {ctl1['sd']:.2f})"
    mae = f"MAE's mean gain is {mae1['mean']:+.2f} (sd {mae1['sd']:.2f}) at 1%, {mae10['mean']:+.2f} at 10%"
    if clears(mae1) and ctl1["mean"] >= GAIN:
        return {"word": "PASS", "why": f"{mae}; {control}"}
    if mae1["mean"] < NULL and mae10["mean"] < NULL and clears(ctl1):
        return {"word": "FAIL", "why": f"{mae}; {control}"}
    return {"word": "INCONCLUSIVE", "why": f"{mae}; {control}: neither PASS nor FAIL holds at this budget"}


def finish(results: dict) -> str:
    """Fill results' `cells`, `gains` and `verdict` from the test scores; returns the markdown table."""
    test = results["test"]
    cells = {
        arm: {b: [test[r]["miou"] for r in c["runs"]] for b, c in by.items()}
        for arm, by in results["arms"].items()
    }
    results["cells"] = {arm: {b: spread(v) for b, v in by.items()} for arm, by in cells.items()}
    results["gains"] = {
        arm: {b: paired(cells[arm][b], cells["scratch"][b]) for b in cells[arm]} for arm in ("mae", "control")
    }
    results["verdict"] = verdict(results["gains"])
    return table(results)


# ----------------------------------------------------------------------------------------------------------
# the table


def _pm(values: list[float]) -> str:
    s = spread(values)
    return f"{s['mean']:.1f} ± {s['sd']:.1f}"


def table(results: dict) -> str:
    test, arms = results["test"], results["arms"]
    lines = []
    if results.get("quick"):
        lines += ["**QUICK MODE** (tiny budgets, a check of the code): these numbers are not a result.", ""]
    lines += [
        "| budget | arm | lr (the selection: validation mIoU, seed 0) | test mIoU | test mAcc | gain over scratch (per seed) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for budget in next(iter(arms.values())):
        for arm, by in arms.items():
            c = by[budget]
            grid = ", ".join(f"{'**' if float(lr) == c['lr'] else ''}{lr}: {v:.1f}{'**' if float(lr) == c['lr'] else ''}"
                             for lr, v in c.get("val_by_lr", {}).items()) or f"{c['lr']:g}"  # fmt: skip
            miou = [test[r]["miou"] for r in c["runs"]]
            macc = [test[r]["macc"] for r in c["runs"]]
            flag = sum(bool(test[r]["collapsed"]) for r in c["runs"])
            g = results["gains"].get(arm, {}).get(budget)
            gain = (
                f"{g['mean']:+.1f} ± {g['sd']:.1f} ({', '.join(f'{d:+.1f}' for d in g['diffs'])})"
                if g
                else ""
            )
            note = f" ({flag} collapsed)" if flag else ""
            lines.append(f"| {budget} | {arm} | {grid} | {_pm(miou)}{note} | {_pm(macc)} | {gain} |")
    v = results["verdict"]
    lines += ["", f"**Verdict: {v['word']}** ({v['why']}).", ""]
    lines += _secondary(results)
    return "\n".join(lines) + "\n"


def _secondary(results: dict) -> list[str]:
    test, enc, knn = results["test"], results["encoders"], results["knn"]
    pilot = results["pilot"]
    out = [
        f"- Run length: {pilot['steps']} steps, from the pilot's validation mIoU "
        f"({', '.join(f'{s}: {m:.1f}' for s, m in pilot['curve'])}).",
        f"- MAE encoder: {enc['pretrain_epochs']} epochs of the training scenes, "
        f"{enc['pretrain_token_passes'] / 1e6:.1f}M encoder token passes against {enc['finetune_token_passes'] / 1e6:.1f}M "
        f"for one fine-tune; k-NN top-1 of centred garments: MAE {knn['mae']:.1f}%, positive control "
        f"{knn['control']:.1f}%, random {knn['random']:.1f}%.",
    ]
    for name, p in results["probe"].items():
        vals = ", ".join(f"{b}: {m:.1f}" for b, m in p["val_by_block"].items())
        out.append(f"- Frozen-encoder probe, {name}: block {p['block']} (validation {vals}); test mIoU "
                   f"{_pm([test[r]['miou'] for r in p['runs']])}.")  # fmt: skip
    pos = results["position_table"]
    parts = [f"{m}: validation {statistics.mean(pos[m]['val']):.1f}, test "
             f"{_pm([test[r]['miou'] for r in pos[m]['runs']])}" for m in ("recompute", "resample")]  # fmt: skip
    out.append(f"- The demo encoder's position table at 56 px ({'; '.join(parts)}): {pos['chosen']}.")
    small = results["small_set"]
    out.append("- Small labelled set (validation): " + "; ".join(
        f"{arm} mIoU {s['miou']:.1f}, mAcc {s['macc']:.1f}{', collapsed' if s['collapsed'] else ''}"
        for arm, s in small.items()) + ".")  # fmt: skip
    r = results["recipe"]
    out.append(f"- For `recipes/segment_demo.yaml`: train.blr {r['train.blr']:g} (lr {r['train.blr'] * 16 / 256:g} "
               f"at batch 16), train.max_steps {r['train.max_steps']}, model.pos_embed_adapt "
               f"{r['model.pos_embed_adapt']}.")  # fmt: skip
    wall = sum(t["wall_s"] for t in results["times"].values())
    cpu = sum(t["cpu_s"] for t in results["times"].values())
    out.append(f"- Time of the runs made by this invocation and earlier ones: {wall / 3600:.1f} h wall, "
               f"{cpu / 3600:.1f} h CPU.")  # fmt: skip
    return out


def write_doc(doc: Path, text: str) -> None:
    """Replace what stands between the BEGIN and END markers of `doc` by `text`."""
    s = doc.read_text()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block for the table")
    head, rest = s.split(BEGIN, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")
