"""The demo's digit canvases as an ultralytics (YOLO-format) dataset, written once per data configuration.

Layout under ``cache_dir/yolo-data-<hash>/`` (the hash is that of the `DataConfig`, so every run
with the same canvases reuses the folder)::

    images/{train,val,test}/00000.png   one-channel 8-bit PNGs (ultralytics reads them as 3 channels)
    labels/{train,val,test}/00000.txt   one "class cx cy w h" line per digit, normalised to [0, 1]
    data.yaml                           absolute path, the three splits, names "0".."9"

A box is the canvas's pixel-edge ``(x1, y1, x2, y2)``, so ``cx = (x1 + x2) / 2 / S`` and
``w = (x2 - x1) / S`` for an ``S``-pixel canvas: ultralytics' predictions come back in the same
coordinates, and COCO AP is computed against the original boxes (`coco_ground_truth`).
``data.yaml`` is written last, so a folder without it (an interrupted export) is rewritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .data import SPLITS, DataConfig, DetectionSplit
from .train import config_hash

__all__ = ["FORMAT_VERSION", "yolo_dataset_dir", "write_yolo_dataset", "label_lines", "image_paths"]

FORMAT_VERSION = 1


def yolo_dataset_dir(data_cfg: DataConfig, cache_dir: Path) -> Path:
    """The folder of ``data_cfg``'s YOLO-format export under ``cache_dir``."""
    key = config_hash({"format": FORMAT_VERSION, "data": data_cfg.to_dict()})
    return Path(cache_dir) / f"yolo-data-{key}"


def label_lines(split: DetectionSplit, i: int) -> list[str]:
    """Canvas ``i``'s YOLO label lines: ``class cx cy w h``, normalised by the canvas side."""
    side = float(split.images.shape[-1])
    lines = []
    for (x1, y1, x2, y2), label in zip(split.boxes[i].tolist(), split.labels[i].tolist()):
        cx, cy = (x1 + x2) / 2 / side, (y1 + y2) / 2 / side
        w, h = (x2 - x1) / side, (y2 - y1) / side
        lines.append(f"{int(label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def image_paths(root: Path, split: str, count: int) -> list[Path]:
    """The image files of ``split`` in canvas order (canvas ``i`` is ``images/<split>/<i:05d>.png``)."""
    return [Path(root) / "images" / split / f"{i:05d}.png" for i in range(count)]


def write_yolo_dataset(splits: dict[str, DetectionSplit], data_cfg: DataConfig, cache_dir: Path) -> Path:
    """Write ``splits`` (the canvases of ``data_cfg``) in YOLO format unless already there; return ``data.yaml``.

    The export is built in a temporary sibling folder and renamed into place, so concurrent or
    interrupted runs never leave a half-written dataset behind a ``data.yaml``.
    """
    import yaml
    from PIL import Image

    root = yolo_dataset_dir(data_cfg, cache_dir)
    data_yaml = root / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in SPLITS:
        split = splits[name]
        (tmp / "images" / name).mkdir(parents=True)
        (tmp / "labels" / name).mkdir(parents=True)
        images = split.images.numpy()
        for i, path in enumerate(image_paths(tmp, name, len(split))):
            Image.fromarray(np.ascontiguousarray(images[i, 0])).save(path)  # uint8 (S, S): mode L
            lines = label_lines(split, i)
            (tmp / "labels" / name / f"{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    spec = {
        "path": str(root.resolve()),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "names": {k: str(k) for k in range(10)},
    }
    data_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data_yaml
