"""COCO instances for detection and instance segmentation: sources, large-scale jitter, loaders.

Sources (`data.train` / `data.val`):

- a COCO instances JSON file, its images beside it or in `images/` beside it;
- a directory holding `annotations.json` and `images/`;
- the COCO 2017 release directory (`annotations/instances_{train,val}2017.json`, `train2017/`, `val2017/`):
  `data.train` reads train2017, `data.val` val2017;
- `fashion-mnist-instances[:train|:test]`: the scenes of `fashion-mnist-scenes` (mae.data.segmentation) with each
  garment an instance: its mask (the pixels where it is on top and its ink >= 64, the segmentation scenes' class
  pixels), its box (the mask's) and its class (categories 1-10, Fashion-MNIST's classes in order); a range of a
  split, `fashion-mnist-instances:train[19000:20000]`, is those scenes alone, as the segmentation scenes'.

Masks come as polygons or RLE (compressed or not) and are decoded by pycocotools. Category ids map to contiguous
labels 1..K in the order of their ids (0 is the background) and back. `iscrowd` regions are left out of training,
as detectron2 and torchvision's references do, and count in evaluation as COCOeval treats them (matches to them
are ignored). Images without annotations are kept as negatives.

Bad input: a JSON file that is not COCO instances, an annotation whose `category_id` is not in `categories` or whose
`image_id` is not in `images`, an annotation without `segmentation`: one line naming the file and the record
(DataError, exit 2). A box of zero area, or one outside its image: dropped, or clipped to the image, and counted.
Image files that are missing are named, left out and counted; unreadable ones are skipped and counted where they
are read (a source with no image left is an error).

Training transform, ViTDet's large-scale jitter with torchvision.transforms.v2 on tv_tensors (image, boxes and
masks together): horizontal flip, a resize to `data.ratio_range` (0.1-2.0 in ViTDet) times the scale that fits the
image into `model.img_size`, normalisation, a `model.img_size` crop at a random place (the image padded with the
mean at the bottom and right where it is smaller), boxes clamped and those left empty removed. Evaluation: the
longest side resized to `model.img_size`, normalised, padded the same way. Randomness comes from (seed, epoch,
position in the epoch), so a resumed run sees the same batches.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode

from .images import BadSampleLog
from .loaders import MapTrainLoader, rank_block_loader
from .segmentation import IGNORE, BadPair, Scenes, read_image_file, read_scenes
from .sources import FMNIST_CLASSES, DataError
from .transforms import resolve_norm, sample_seed, seeded

INSTANCES = "fashion-mnist-instances"
CATEGORIES = "categories.json"  # in a run's output_dir: its training categories, for mae-detect-predict
RELEASE = {True: "train2017", False: "val2017"}


# ----------------------------------------------------------------------------------------------------------
# COCO files


def _record(rec) -> str:
    """A record for an error message: its id, or its start."""
    if isinstance(rec, dict) and "id" in rec:
        return f"(id {rec['id']!r})"
    text = json.dumps(rec)[:60]
    return f"({text}...)"


def read_coco(path: str) -> dict:
    """A COCO instances JSON file, checked: the three lists, the fields this toolkit reads, every annotation's
    category and image known. Raises DataError naming the file and the first bad record."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: not COCO instances (the top level is a {type(data).__name__}, not an object)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: not COCO instances: no '{key}' list")
    need = {"images": ("id", "file_name", "width", "height"), "categories": ("id", "name"),
            "annotations": ("image_id", "category_id", "bbox", "segmentation")}  # fmt: skip
    for key, fields in need.items():
        for i, rec in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(rec, dict) or f not in rec]
            if missing:
                raise DataError(f"{path}: {key}[{i}] {_record(rec)} has no '{missing[0]}'")
    images, cats = {im["id"] for im in data["images"]}, {c["id"] for c in data["categories"]}
    if len(images) < len(data["images"]) or len(cats) < len(data["categories"]):
        raise DataError(f"{path}: not COCO instances: image or category ids repeat")
    for i, ann in enumerate(data["annotations"]):
        if ann["category_id"] not in cats:
            raise DataError(
                f"{path}: annotations[{i}] {_record(ann)}: category_id {ann['category_id']!r} is not in categories"
            )
        if ann["image_id"] not in images:
            raise DataError(
                f"{path}: annotations[{i}] {_record(ann)}: image_id {ann['image_id']!r} is not in images"
            )
        if not (isinstance(ann["bbox"], list) and len(ann["bbox"]) == 4):
            raise DataError(f"{path}: annotations[{i}] {_record(ann)}: bbox is not [x, y, width, height]")
    return data


def resolve_coco(source: str, train: bool) -> tuple[str, str, str]:
    """(annotation file, image folder, layout) of a COCO source (module docstring)."""
    if os.path.isfile(source):
        root = os.path.dirname(source) or "."
        images = os.path.join(root, "images")
        return source, images if os.path.isdir(images) else root, "COCO JSON file"
    if os.path.isfile(os.path.join(source, "annotations.json")) and os.path.isdir(
        os.path.join(source, "images")
    ):
        return (
            os.path.join(source, "annotations.json"),
            os.path.join(source, "images"),
            "annotations.json + images/",
        )
    split = RELEASE[train]
    ann = os.path.join(source, "annotations", f"instances_{split}.json")
    if os.path.isfile(ann) and os.path.isdir(os.path.join(source, split)):
        return ann, os.path.join(source, split), f"COCO 2017 {split}"
    what = "no such file or directory" if not os.path.exists(source) else "no COCO layout found"
    raise DataError(
        f"detection data {source!r}: {what} (a COCO instances JSON file, a directory with annotations.json and "
        f"images/, the COCO 2017 release directory, or {INSTANCES})"
    )


def ann_mask(seg, h: int, w: int) -> np.ndarray:
    """An annotation's mask (h, w) uint8 from polygons, uncompressed or compressed RLE (pycocotools). Polygons of
    fewer than 3 points are left out (pycocotools would read 2 points as a box)."""
    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        if not polys:
            return np.zeros((h, w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


@dataclass
class BoxCounts:
    """What reading a source's annotations did to their boxes, for the log."""

    clipped: int = 0  # partly outside the image: clipped to it
    dropped: int = 0  # zero area, or nothing left inside the image
    crowd: int = 0  # iscrowd regions, left out of training

    def line(self, name: str) -> str | None:
        parts = [f"{self.clipped} boxes partly outside their image clipped"] if self.clipped else []
        parts += [f"{self.dropped} boxes of zero area or outside their image dropped"] if self.dropped else []
        parts += [f"{self.crowd} crowd regions (iscrowd) left out of training"] if self.crowd else []
        return f"{name}: " + ", ".join(parts) if parts else None


def clip_box(bbox, w: int, h: int) -> tuple[list[float] | None, bool]:
    """COCO [x, y, w, h] -> (xyxy clipped to the image or None when nothing is left, whether it was clipped)."""
    x0, y0, bw, bh = (float(v) for v in bbox)
    box = [max(0.0, x0), max(0.0, y0), min(float(w), x0 + bw), min(float(h), y0 + bh)]
    if bw <= 0 or bh <= 0 or box[2] <= box[0] or box[3] <= box[1]:
        return None, False
    return box, box != [x0, y0, x0 + bw, y0 + bh]


class Packed:
    """Per-image records pickled into one numpy buffer: forked loader workers share it without touching Python
    objects (whose reference counts would copy every page they sit on)."""

    def __init__(self, records: list):
        blobs = [np.frombuffer(pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL), np.uint8) for r in records]
        self.ends = np.cumsum([len(b) for b in blobs]).astype(np.int64)
        self.buf = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int):
        start = int(self.ends[i - 1]) if i else 0
        return pickle.loads(self.buf[start : int(self.ends[i])].tobytes())


@dataclass
class Instances:
    """One image's objects: boxes (K, 4) xyxy float32 in pixels, labels (K,) int64 in 1..num classes, masks
    (K, H, W) uint8."""

    boxes: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


class CocoSource:
    """The images of a COCO instances file whose files exist, with their non-crowd annotations (boxes clipped,
    empty ones dropped: `counts`). `categories` the file's, sorted by id; label i + 1 is categories[i]."""

    def __init__(self, source: str, train: bool, log_fn=print):
        self.ann_file, self.image_dir, self.layout = resolve_coco(source, train)
        data = read_coco(self.ann_file)
        self.categories = sorted(({"id": c["id"], "name": str(c["name"])} for c in data["categories"]),
                                 key=lambda c: c["id"])  # fmt: skip
        label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.counts, by_image = BoxCounts(), {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        records, missing = [], []
        for im in data["images"]:
            path = os.path.join(self.image_dir, im["file_name"])
            if not os.path.isfile(path):
                missing.append(path)
                continue
            anns = []
            for ann in by_image.get(im["id"], ()):
                if ann.get("iscrowd", 0):
                    self.counts.crowd += 1
                    continue
                box, clipped = clip_box(ann["bbox"], im["width"], im["height"])
                self.counts.dropped += box is None
                self.counts.clipped += clipped
                if box is not None:
                    anns.append((label[ann["category_id"]], box, ann["segmentation"]))
            records.append((path, im["file_name"], im["id"], im["width"], im["height"], anns))
        if missing:
            log_fn(f"{self.ann_file}: {len(missing)} image file(s) missing, left out (first: {missing[0]})")
        if not records:
            raise DataError(
                f"detection data {source!r}: none of its {len(data['images'])} images is in {self.image_dir}"
            )
        self.records, self.missing = Packed(records), len(missing)
        self.objects = sum(len(r[5]) for r in records)  # annotated objects (not crowd) of the images kept
        self.image_ids = np.array([r[2] for r in records], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def name(self, i: int) -> str:
        return self.records[i][0]

    def file_name(self, i: int) -> str:
        return self.records[i][1]

    def image(self, i: int, in_chans: int) -> torch.Tensor:
        """Image i, float32 (C, H, W) in [0, 1]. Raises BadPair (unreadable, another size than its record says)."""
        path, _, _, w, h, _ = self.records[i]
        img = read_image_file(path, in_chans)
        if tuple(img.shape[1:]) != (h, w):
            raise BadPair(f"{path}: the image is {img.shape[2]}x{img.shape[1]}, its record says {w}x{h}")
        return img

    def load(self, i: int, in_chans: int) -> tuple[torch.Tensor, Instances]:
        """(image i, its instances). Raises BadPair."""
        img = self.image(i, in_chans)
        _, _, _, w, h, anns = self.records[i]
        masks = (
            np.stack([ann_mask(seg, h, w) for _, _, seg in anns]) if anns else np.zeros((0, h, w), np.uint8)
        )
        return img, Instances(
            torch.tensor([a[1] for a in anns], dtype=torch.float32).reshape(-1, 4),
            torch.tensor([a[0] for a in anns], dtype=torch.int64),
            torch.from_numpy(masks),
        )

    def coco(self):
        """The ground truth as pycocotools reads the file (crowd regions and all), for COCOeval; an annotation
        without `area` gets its mask's, one without `iscrowd` 0 (COCOeval reads both)."""
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(self.ann_file)
        for ann in gt.anns.values():
            ann.setdefault("iscrowd", 0)
            if "area" not in ann:
                ann["area"] = float(mask_utils.area(gt.annToRLE(ann)))
        return gt


@dataclass
class SceneInstances:
    """fashion-mnist-instances: the fashion-mnist-scenes canvases with each visible garment an instance."""

    scenes: Scenes
    categories: list = field(
        default_factory=lambda: [{"id": c + 1, "name": n} for c, n in enumerate(FMNIST_CLASSES)]
    )
    counts: BoxCounts = field(default_factory=BoxCounts)
    layout: str = INSTANCES
    missing: int = 0

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def image_ids(self) -> np.ndarray:
        return np.arange(1, len(self) + 1, dtype=np.int64)

    @property
    def objects(self) -> int:
        return len(self)  # at least one per scene: the garment drawn last lies on top of the others

    def name(self, i: int) -> str:
        return f"{INSTANCES}:{self.scenes.split}#{self.scenes.start + i}"

    def file_name(self, i: int) -> str:
        return f"{i:05d}.png"

    def draw(self, i: int) -> tuple[np.ndarray, Instances]:
        """(canvas uint8 (56, 56), its garments as instances); a garment hidden under the others is none."""
        canvas, mask = self.scenes.draw(i)
        owner = np.full(canvas.shape, -1)
        g = self.scenes.garments.shape[1]
        places = self.scenes.placements(i)
        for k, (j, y, x) in enumerate(places):
            owner[y : y + g, x : x + g][self.scenes.garments[j] > 0] = k
        labelled = (mask > 0) & (mask != IGNORE)
        masks = [(owner == k) & labelled for k in range(len(places))]
        keep = [k for k, m in enumerate(masks) if m.any()]
        boxes = [_mask_box(masks[k]) for k in keep]
        labels = [int(self.scenes.labels[places[k][0]]) + 1 for k in keep]
        inst = Instances(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor(labels, dtype=torch.int64),
            torch.from_numpy(np.stack([masks[k] for k in keep]).astype(np.uint8)) if keep
            else torch.zeros(0, *canvas.shape, dtype=torch.uint8),
        )  # fmt: skip
        return canvas, inst

    def load(self, i: int, in_chans: int) -> tuple[torch.Tensor, Instances]:
        canvas, inst = self.draw(i)
        return self._image(canvas, in_chans), inst

    def image(self, i: int, in_chans: int) -> torch.Tensor:
        return self._image(self.scenes.draw(i)[0], in_chans)

    @staticmethod
    def _image(canvas: np.ndarray, in_chans: int) -> torch.Tensor:
        if in_chans not in (1, 3):
            raise DataError(
                f"{INSTANCES} are grayscale images: model.in_chans must be 1 or 3, got {in_chans}"
            )
        return torch.from_numpy(canvas).float().div_(255).expand(in_chans, -1, -1).contiguous()

    def coco_dataset(self, indices, save_to=None) -> dict:
        """Scenes `indices` as a COCO instances dict (image id = index + 1; RLE masks, boxes, areas); with
        `save_to`, each canvas is written there as its file_name."""
        images, anns = [], []
        for i in indices:
            canvas, inst = self.draw(i)
            if save_to is not None:
                from PIL import Image

                Image.fromarray(canvas).save(os.path.join(save_to, self.file_name(i)))
            h, w = canvas.shape
            images.append({"id": i + 1, "file_name": self.file_name(i), "width": w, "height": h})
            for (x0, y0, x1, y1), label, rle in zip(
                inst.boxes.tolist(), inst.labels.tolist(), encode_masks(inst.masks)
            ):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label, "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask_utils.area(rle)),
                             "segmentation": rle})  # fmt: skip
        return {"images": images, "annotations": anns, "categories": self.categories}

    def coco(self):
        """The ground truth as a pycocotools COCO object."""
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = self.coco_dataset(range(len(self)))
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """Binary masks (K, H, W) -> COCO's compressed RLE dicts with `size` and `counts` (a str: JSON-ready)."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.to(torch.uint8).cpu().numpy().transpose(1, 2, 0)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _mask_box(m: np.ndarray) -> list[float]:
    """The xyxy box (pixel edges) around a non-empty mask."""
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def det_source(source: str, *, train: bool, fmnist_dir: str = "", log_fn=print):
    """The detection source `source` names (module docstring)."""
    name, _, split = source.partition(":")
    if name == INSTANCES:
        return SceneInstances(read_scenes(INSTANCES, split, train, fmnist_dir))
    return CocoSource(source, train, log_fn)


def check_categories(train_src, val_src, val_name: str) -> None:
    """data.val must have data.train's categories (ids and names): the model's labels are the training file's."""
    if [(c["id"], c["name"]) for c in val_src.categories] != [
        (c["id"], c["name"]) for c in train_src.categories
    ]:
        theirs = ", ".join(f"{c['id']}:{c['name']}" for c in val_src.categories[:3])
        ours = ", ".join(f"{c['id']}:{c['name']}" for c in train_src.categories[:3])
        raise DataError(
            f"data.val={val_name!r} has other categories ({theirs}, ...) than data.train ({ours}, ...)"
        )


# ----------------------------------------------------------------------------------------------------------
# transforms


@dataclass
class DetTransform:
    """Training (large-scale jitter) or evaluation (longest side to `size`) transform; see the module docstring."""

    size: int
    mean: list[float]
    std: list[float]
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: bool = True
    train: bool = True

    def __call__(self, img: torch.Tensor, inst: Instances, seed: int = 0):
        """-> (image (C, size, size), target {boxes, labels, masks (K, size, size)}, the image's part of the
        canvas (h, w))."""
        if not self.train:
            h, w = img.shape[1:]
            s = self.size / max(h, w)
            part = (max(1, round(h * s)), max(1, round(w * s)))
            img = TF.resize(img, list(part), InterpolationMode.BILINEAR, antialias=True)
            return self._canvas(TF.normalize(img, self.mean, self.std)), None, part
        with seeded(seed):
            return self._jitter(img, inst)

    def _canvas(self, x):
        """The top-left `size` x `size` of x, zero-padded at the bottom / right (x: any tv_tensor or tensor)."""
        return TF.crop(x, 0, 0, self.size, self.size)

    def _jitter(self, img: torch.Tensor, inst: Instances):
        h, w = img.shape[1:]
        sample = {
            "image": tv_tensors.Image(img),
            "boxes": tv_tensors.BoundingBoxes(inst.boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(inst.masks),
            "labels": inst.labels,
        }
        sample = v2.Compose([
            v2.RandomHorizontalFlip(0.5 if self.hflip else 0.0),
            v2.ScaleJitter((self.size, self.size), self.scale_range),
        ])(sample)  # fmt: skip
        sample["image"] = TF.normalize(sample["image"], self.mean, self.std)  # padding below is the mean
        h, w = sample["image"].shape[1:]
        top = int(torch.randint(0, max(h - self.size, 0) + 1, ()))
        left = int(torch.randint(0, max(w - self.size, 0) + 1, ()))
        for k in ("image", "boxes", "masks"):
            sample[k] = TF.crop(sample[k], top, left, self.size, self.size)
        sample = v2.SanitizeBoundingBoxes()(
            sample
        )  # boxes the crop left empty go, with their labels and masks
        keep = (
            sample["masks"].flatten(1).amax(1) > 0
            if len(sample["masks"])
            else torch.zeros(0, dtype=torch.bool)
        )
        # (and so do objects whose mask the crop left out)
        target = {"boxes": sample["boxes"].as_subclass(torch.Tensor)[keep].float(), "labels": sample["labels"][keep],
                  "masks": sample["masks"].as_subclass(torch.Tensor)[keep]}  # fmt: skip
        return sample["image"].as_subclass(torch.Tensor), target, (min(h, self.size), min(w, self.size))


def det_transform(data_cfg, img_size: int, in_chans: int, train: bool) -> DetTransform:
    """The transform the `data` section describes: data.mean / data.std, data.ratio_range, data.hflip."""
    mean, std = resolve_norm(data_cfg.mean, data_cfg.std, in_chans)
    ratio = tuple(float(v) for v in data_cfg.ratio_range)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise DataError(
            f"data.ratio_range must be [low, high] with 0 < low <= high, got {list(data_cfg.ratio_range)}"
        )
    return DetTransform(img_size, mean, std, ratio, bool(data_cfg.hflip), train)


# ----------------------------------------------------------------------------------------------------------
# loaders


class Targets(list):
    """A batch's per-image target dicts and the part of the canvas each image fills (`image_sizes`), with what
    the training loop asks of a label batch: `shape`, `to` and `new_zeros` (images with no object: an all-bad
    batch goes through as negatives, its loss multiplied by 0)."""

    def __init__(self, targets=(), image_sizes=(), size: int = 0, device=None):
        super().__init__(targets)
        self.image_sizes, self.size, self.device = list(image_sizes), size, torch.device(device or "cpu")

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def to(self, device, non_blocking: bool = False) -> Targets:
        moved = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self]
        return Targets(moved, self.image_sizes, self.size, device)

    def new_zeros(self, n: int, *_) -> Targets:
        d = self.device
        empty = {"boxes": torch.zeros(0, 4, device=d), "labels": torch.zeros(0, dtype=torch.int64, device=d),
                 "masks": torch.zeros(0, self.size, self.size, dtype=torch.uint8, device=d)}  # fmt: skip
        return Targets([dict(empty) for _ in range(n)], [(self.size, self.size)] * n, self.size, d)


class _DetDataset(torch.utils.data.Dataset):
    """(index, position) -> (image, target, part, index) or None for a bad image; randomness from (seed, epoch,
    position)."""

    def __init__(self, src, transform: DetTransform, in_chans: int, seed: int, epoch: int):
        self.src, self.transform, self.in_chans, self.seed, self.epoch = src, transform, in_chans, seed, epoch
        self.badlog = BadSampleLog()

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, item):
        i, pos = int(item[0]), item[1]
        try:  # evaluation scores against the source's own ground truth: the image is all it needs
            img, inst = (
                self.src.load(i, self.in_chans)
                if self.transform.train
                else (self.src.image(i, self.in_chans), None)
            )
        except BadPair as e:
            self.badlog(self.src.name(i), str(e))
            return None
        original = tuple(img.shape[1:])
        img, target, part = self.transform(img, inst, sample_seed(self.seed, self.epoch, pos))
        return img, target, part, original, i


class DetTrainLoader(MapTrainLoader):
    """Training batches of a rank: (images (B', C, S, S), Targets, n_bad) on the CPU for steps start_step ..
    steps_per_epoch - 1 (mae.data.loaders.MapTrainLoader: the data order a pure function of (seed, epoch, step))."""

    what = "detection data: images"

    def __init__(
        self, src, transform, *, in_chans, batch_size, seed, rank, world_size, workers, epoch_samples=0
    ):
        super().__init__(len(src), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         workers=workers, epoch_samples=epoch_samples)  # fmt: skip
        self.src, self.transform, self.in_chans = src, transform, in_chans

    def dataset(self, epoch: int) -> _DetDataset:
        return _DetDataset(self.src, self.transform, self.in_chans, self.seed, epoch)

    def collate(self, items):
        good, size = [it for it in items if it is not None], self.transform.size
        images = torch.stack([g[0] for g in good]) if good else torch.zeros(0, self.in_chans, size, size)
        return images, Targets([g[1] for g in good], [g[2] for g in good], size), len(items) - len(good)


class DetEvalLoader:
    """Every image once across ranks (rank r: a contiguous block; nothing padded or scored twice): lists of
    (image (C, S, S), None, its part of the canvas, its original (H, W), source index) and the bad count."""

    def __init__(self, src, transform, *, in_chans, batch_size, rank, world_size, workers):
        ds = _DetDataset(src, transform, in_chans, 0, 0)
        self._loader = rank_block_loader(
            ds, len(src), batch_size=batch_size, rank=rank, world_size=world_size, workers=workers
        )

    def __iter__(self):
        return iter(self._loader)
