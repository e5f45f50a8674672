"""Read a labeled detection dataset from disk: Pascal VOC, YOLO or COCO, into one plain form.

Why our own small readers: the three formats are simple and stable, and the libraries that read all of them
(fiftyone, supervision, ...) would bring far more than they save. Boxes are kept in pixels of the image as
stored; a box is clipped to the image, and one with no area left is dropped and counted.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

Format = Literal["voc", "yolo", "coco"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetFormatError(ValueError):
    """The folder is not a dataset of the named format; the message says what is missing."""


@dataclass(frozen=True)
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass
class LabeledImage:
    path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    split: str | None = None  # the dataset's own split (train / val / test) when it has one


@dataclass
class DetectionDataset:
    format: Format
    root: Path
    labels: list[str]
    images: list[LabeledImage]
    dropped_boxes: int = 0

    def box_counts(self) -> Counter[str]:
        return Counter(b.label for im in self.images for b in im.boxes)


def _clip(label: str, x0: float, y0: float, x1: float, y1: float, w: int, h: int) -> Box | None:
    x0, x1 = sorted((max(0.0, min(float(w), x0)), max(0.0, min(float(w), x1))))
    y0, y1 = sorted((max(0.0, min(float(h), y0)), max(0.0, min(float(h), y1))))
    return Box(label, x0, y0, x1, y1) if x1 - x0 >= 1 and y1 - y0 >= 1 else None


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def read_voc(root: Path) -> DetectionDataset:
    """``Annotations/*.xml`` + ``JPEGImages/``; ``ImageSets/Main/{train,val,test}.txt`` give the split."""
    base = root
    if not (root / "Annotations").is_dir():  # a VOC folder wrapped in one more (e.g. VOC2012/, BCCD/)
        inner = [p for p in root.iterdir() if (p / "Annotations").is_dir()]
        base = inner[0] if len(inner) == 1 else root
    ann_dir, img_dir = base / "Annotations", base / "JPEGImages"
    if not ann_dir.is_dir() or not img_dir.is_dir():
        raise DatasetFormatError(f"{root} is not a VOC dataset: Annotations/ and JPEGImages/ are needed")
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        listing = base / "ImageSets" / "Main" / f"{split}.txt"
        if listing.is_file():
            split_of.update({line.strip(): split for line in listing.read_text().split() if line.strip()})
    images, labels, dropped = [], [], 0
    for xml in sorted(ann_dir.glob("*.xml")):
        tree = ET.parse(xml).getroot()
        name = tree.findtext("filename") or f"{xml.stem}.jpg"
        path = img_dir / name
        if not path.is_file():
            candidates = [p for p in img_dir.glob(f"{xml.stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES]
            if not candidates:
                continue  # an annotation without its image: nothing to label
            path = candidates[0]
        w, h = _image_size(path)
        boxes = []
        for obj in tree.iter("object"):
            label = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if not label or bb is None:
                dropped += 1
                continue
            try:
                coords = [float(bb.findtext(k) or "nan") for k in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                dropped += 1
                continue
            box = _clip(label, *coords, w, h)
            if box is None:
                dropped += 1
                continue
            boxes.append(box)
            if label not in labels:
                labels.append(label)
        images.append(LabeledImage(path, w, h, boxes, split_of.get(xml.stem)))
    if not images:
        raise DatasetFormatError(f"{root}: no annotation has its image in {img_dir}")
    return DetectionDataset("voc", root, sorted(labels), images, dropped)


def read_yolo(root: Path) -> DetectionDataset:
    """``images/[split/]*`` + ``labels/[split/]*.txt`` and the class names from ``data.yaml`` or ``classes.txt``."""
    import yaml

    names: list[str] | None = None
    for candidate in ("data.yaml", "dataset.yaml"):
        if (root / candidate).is_file():
            raw = (yaml.safe_load((root / candidate).read_text()) or {}).get("names")
            names = [raw[k] for k in sorted(raw)] if isinstance(raw, dict) else list(raw or [])
            break
    if names is None and (root / "classes.txt").is_file():
        names = [n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    if not names:
        raise DatasetFormatError(f"{root} is not a YOLO dataset: data.yaml (names) or classes.txt is needed")
    img_root = root / "images"
    if not img_root.is_dir():
        raise DatasetFormatError(f"{root} is not a YOLO dataset: images/ is missing")
    images, dropped = [], 0
    for path in sorted(p for p in img_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(img_root)
        label_file = (root / "labels" / rel).with_suffix(".txt")
        w, h = _image_size(path)
        boxes = []
        lines = label_file.read_text().splitlines() if label_file.is_file() else []
        for line in lines:
            parts = line.split()
            if not parts:
                continue
            try:
                cls, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:5])
                label = names[cls]
            except (ValueError, IndexError):
                dropped += 1
                continue
            box = _clip(
                label, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h, w, h
            )
            if box is None:
                dropped += 1
            else:
                boxes.append(box)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "val", "test") else None
        images.append(LabeledImage(path, w, h, boxes, split))
    if not images:
        raise DatasetFormatError(f"{root}: no image under images/")
    return DetectionDataset("yolo", root, list(names), images, dropped)


def read_coco(root: Path) -> DetectionDataset:
    """One or more COCO ``*.json`` files (under ``annotations/`` or the root); images found by file_name."""
    files = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
    files = files or sorted(root.glob("*.json"))
    if not files:
        raise DatasetFormatError(f"{root} is not a COCO dataset: no annotations/*.json or *.json")
    images, labels, dropped = [], set(), 0
    for file in files:
        doc = json.loads(file.read_text())
        if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
            raise DatasetFormatError(f"{file} is not a COCO file: 'images' and 'annotations' are needed")
        cats = {c["id"]: str(c["name"]) for c in doc.get("categories", [])}
        by_image: dict[int, list[dict]] = {}
        for a in doc["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        split = next((s for s in ("train", "val", "test") if s in file.stem.lower()), None)
        for im in doc["images"]:
            path = next(
                (p for p in (root / im["file_name"], root / "images" / im["file_name"]) if p.is_file()),
                None,
            )
            if path is None:
                hits = list(root.rglob(Path(im["file_name"]).name))
                if not hits:
                    continue
                path = hits[0]
            w, h = int(im.get("width") or 0), int(im.get("height") or 0)
            if not w or not h:
                w, h = _image_size(path)
            boxes = []
            for a in by_image.get(im["id"], []):
                label = cats.get(a.get("category_id"))
                bbox = a.get("bbox") or []
                if label is None or len(bbox) != 4:
                    dropped += 1
                    continue
                x, y, bw, bh = map(float, bbox)
                box = _clip(label, x, y, x + bw, y + bh, w, h)
                if box is None:
                    dropped += 1
                else:
                    boxes.append(box)
                    labels.add(label)
            images.append(LabeledImage(path, w, h, boxes, split))
    if not images:
        raise DatasetFormatError(f"{root}: none of the COCO images was found on disk")
    return DetectionDataset("coco", root, sorted(labels), images, dropped)


READERS = {"voc": read_voc, "yolo": read_yolo, "coco": read_coco}


def read_dataset(fmt: Format, root: Path) -> DetectionDataset:
    if not root.is_dir():
        raise DatasetFormatError(f"{root} is not a folder")
    return READERS[fmt](root)


def rectangle_config(labels: list[str]) -> str:
    """A labeling config for boxes of these labels (what `annoloop import --create` gives a new project)."""
    inner = "".join(f'<Label value="{_xml_attr(label)}"/>' for label in labels)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{inner}</RectangleLabels></View>'
    )


def _xml_attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def to_result(image: LabeledImage, from_name: str = "label", to_name: str = "image") -> list[dict]:
    """Boxes as a Label Studio result (percent coordinates), as an annotator would submit them."""
    out = []
    for i, b in enumerate(image.boxes):
        out.append(
            {
                "id": f"gt{i}",
                "from_name": from_name,
                "to_name": to_name,
                "type": "rectanglelabels",
                "original_width": image.width,
                "original_height": image.height,
                "image_rotation": 0,
                "value": {
                    "x": 100 * b.x0 / image.width,
                    "y": 100 * b.y0 / image.height,
                    "width": 100 * (b.x1 - b.x0) / image.width,
                    "height": 100 * (b.y1 - b.y0) / image.height,
                    "rotation": 0,
                    "rectanglelabels": [b.label],
                },
            }
        )
    return out
