"""Detection predictions of a finished run: the run's model, categories and transform; what INPUT holds (an
image, a folder, a COCO dataset) and the names its outputs take; one image at a time at its own size."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mae.config import ConfigError


def load_run(run_dir: str, which: str, device: torch.device):
    """(model in eval mode, run config, categories, weights file) of a detection run directory."""
    from safetensors.torch import load_file

    from mae.data.detection import CATEGORIES
    from mae.runs.record import task_run
    from mae.weights.build import build_detector

    cfg, path = task_run(run_dir, "detect", which)
    if not (Path(run_dir) / CATEGORIES).is_file():
        raise ConfigError(f"{run_dir}: no {CATEGORIES} (the run has not written a checkpoint yet)")
    categories = json.loads((Path(run_dir) / CATEGORIES).read_text())
    model = build_detector(cfg, len(categories))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval(), cfg, categories, path


class Inputs:
    """What INPUT holds: (path, file_name relative to the input's root, image_id or None) per image, and the root
    (the folder the names are relative to; a COCO dataset's own folder)."""

    def __init__(self, source: str):
        from mae.data.detection import CocoSource
        from mae.data.images import IMAGE_EXTS

        p = Path(source)
        if not p.exists():
            raise ConfigError(f"INPUT {source!r}: no such file or directory")
        self.coco = p.suffix.lower() == ".json" or (p.is_dir() and _is_coco_dir(p))
        if self.coco:
            src = CocoSource(source, train=False, log_fn=lambda line: print(line, file=sys.stderr))
            self.root = p if p.is_dir() else p.parent
            self.items = [(Path(src.name(i)), os.path.relpath(src.name(i), self.root), int(src.image_ids[i]))
                          for i in range(len(src))]  # fmt: skip
        elif p.is_file():
            self.root, self.items = p.parent, [(p, p.name, None)]
        else:
            self.root = p
            self.items = [(f, str(f.relative_to(p)), None) for f in sorted(p.rglob("*"))
                          if f.is_file() and not f.name.startswith(".") and f.suffix[1:].lower() in IMAGE_EXTS]  # fmt: skip
        if not self.items:
            raise ConfigError(f"INPUT {source!r}: no image files")

    def stems(self) -> list[str]:
        """Each image's output stem: its name without the extension, or with it where two would share a stem."""
        plain = [str(Path(name).with_suffix("")) for _, name, _ in self.items]
        clash = {s for s in plain if plain.count(s) > 1}
        return [name if s in clash else s for s, (_, name, _) in zip(plain, self.items)]

    def reserve(self, out) -> None:
        """Claim every output name in `out` (mae.runs.files.OutputDir) before anything is predicted."""
        out.reserve("predictions.json", "the detections of every image")
        for (file, _, _), stem in zip(self.items, self.stems()):
            out.reserve(f"{stem}_overlay.png", str(file))


def _is_coco_dir(p: Path) -> bool:
    return (p / "annotations.json").is_file() or (p / "annotations" / "instances_val2017.json").is_file()


def predict(model, cfg, img: torch.Tensor, device: torch.device) -> dict:
    """One image (C, H, W in the loader's scale) -> its detections in its own pixels (float32, on the CPU)."""
    from mae.data.detection import det_transform

    x, _, part = det_transform(cfg.data, cfg.model.img_size, cfg.model.in_chans, train=False)(img, None)
    with torch.no_grad():
        (det,) = model(x[None].to(device), image_sizes=[part], original_sizes=[tuple(img.shape[1:])])
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in det.items()}


def predict_all(model, cfg, categories: list[dict], device, inputs: Inputs, out, score_thresh: float):
    """Every image of `inputs` into `out` (an OutputDir): its overlay, and its detections scoring `score_thresh`
    or more into predictions.json. Returns (detections, images done, unreadable images)."""
    from PIL import Image

    from mae.eval.coco import to_results
    from mae.eval.figures import detection_overlay
    from mae.infer import read_or_skip

    names = [c["name"] for c in categories]
    results, done, bad = [], 0, 0
    for (file, name, image_id), stem in zip(inputs.items, inputs.stems()):
        img = read_or_skip(file, cfg.model.in_chans)
        if img is None:
            bad += 1
            continue
        det = predict(model, cfg, img, device)
        keep = det["scores"] >= score_thresh
        det = {k: v[keep] for k, v in det.items()}
        results += to_results(det, categories, name, image_id)
        overlay = detection_overlay(img, det, names).permute(1, 2, 0).numpy()
        Image.fromarray(overlay).save(out.file(f"{stem}_overlay.png"), format="PNG")
        done += 1
    out.file("predictions.json").write_text(json.dumps(results))
    return len(results), done, bad
