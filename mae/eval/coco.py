"""COCO box and mask AP by pycocotools' COCOeval, and detections in COCO's results format.

`to_results` turns one image's detections into the results list `COCO.loadRes` reads (category ids of the
training annotations, [x, y, w, h] boxes, compressed RLE masks); `coco_ap` scores a results list against the
ground truth on chosen images: AP at IoU .50:.95, .50 and .75, small / medium / large, and AP per category, in
percent, as detectron2's COCOEvaluator reports them (mask AP with the masks' own areas).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

from pycocotools.cocoeval import COCOeval

from mae.data.detection import encode_masks

STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # the first six of COCOeval.stats


def to_results(det: dict, categories: list[dict], file_name: str, image_id: int | None = None,
               score_thresh: float = 0.0) -> list[dict]:  # fmt: skip
    """One image's detections (boxes (K, 4) xyxy in its pixels, labels 1..len(categories), scores, masks
    (K, 1, H, W) probabilities) -> COCO results: category_id, bbox [x, y, w, h], score, segmentation (mask > 0.5,
    RLE), file_name, and image_id when given. Detections scoring below `score_thresh` are left out."""
    keep = det["scores"] >= score_thresh
    boxes, labels, scores = (
        det["boxes"][keep].tolist(),
        det["labels"][keep].tolist(),
        det["scores"][keep].tolist(),
    )
    rles = encode_masks(det["masks"][keep, 0] > 0.5)
    out = []
    for (x0, y0, x1, y1), label, score, rle in zip(boxes, labels, scores, rles):
        row = {"image_id": image_id} if image_id is not None else {}
        row.update(file_name=file_name, category_id=categories[label - 1]["id"],
                   bbox=[round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                   score=round(score, 5), segmentation=rle)  # fmt: skip
        out.append(row)
    return out


def _evaluate(gt, results: list[dict], iou_type: str, img_ids: list[int]) -> tuple[COCOeval, str]:
    """COCOeval of one kind on `img_ids`, and the table its summarize() prints."""
    if iou_type == "segm":  # with a box present, loadRes would take the box's area for the mask's
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev, text.getvalue()


def per_category_ap(ev: COCOeval) -> list[float | None]:
    """AP (percent) of each category of ev.params.catIds: precision over IoU .50:.95 and recall, all areas, 100
    detections; None for a category with no ground truth."""
    precision = ev.eval["precision"]  # (IoUs, recall points, categories, areas, max detections)
    out = []
    for k in range(precision.shape[2]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out.append(float(p.mean() * 100) if p.size else None)
    return out


def coco_ap(gt, results: list[dict], img_ids: list[int]) -> dict:
    """Box and mask AP of `results` against the pycocotools COCO `gt` on the images `img_ids`: {box_ap, box_ap50,
    ..., mask_ap, ..., per_category: {name: {box_ap, mask_ap}}, summary: {bbox, segm} (COCOeval's tables)}, percent.
    No detections at all: every AP 0 (`no_detections` true), as COCOeval would give."""
    cats = gt.loadCats(gt.getCatIds())
    out: dict = {"detections": len(results), "images": len(img_ids), "no_detections": not results}
    if not results:
        out.update({f"{kind}_{s}": 0.0 for kind in ("box", "mask") for s in STATS})
        out["per_category"] = {c["name"]: {"box_ap": 0.0, "mask_ap": 0.0} for c in cats}
        return out
    out["per_category"], out["summary"] = {c["name"]: {} for c in cats}, {}
    for kind, iou_type in (("box", "bbox"), ("mask", "segm")):
        ev, table = _evaluate(gt, results, iou_type, img_ids)
        out.update({f"{kind}_{s}": _pct(v) for s, v in zip(STATS, ev.stats)})
        names = {c["id"]: c["name"] for c in cats}
        for cat_id, ap in zip(ev.params.catIds, per_category_ap(ev)):
            out["per_category"][names[cat_id]][f"{kind}_ap"] = ap
        out["summary"][iou_type] = table
    return out


def _pct(v: float) -> float | None:
    """A COCOeval statistic in percent; None for its -1 (no ground truth in that area range)."""
    return float(v * 100) if v >= 0 and not math.isnan(v) else None
