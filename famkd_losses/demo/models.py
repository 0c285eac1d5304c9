"""The demo's detectors: torchvision FCOS (or RetinaNet) over small backbones with an FPN P3-P7.

Settings chosen for 128 x 128 one-channel canvases:

- the transform keeps the canvas size (``min_size = max_size = canvas``; torchvision's
  default resizes every image to 800-1333 px) and normalises one channel with mean 0.5,
  std 0.25 (torchvision's default is ImageNet's three-channel mean and std);
- ``score_thresh = 0.05`` (FCOS's torchvision default is 0.2) so COCO AP sees the
  low-confidence tail: AP integrates precision over all recall levels, and detections cut
  by the threshold are recall it never counts;
- anchors (FCOS's locations) sit at the centres of their cells, ``(i + 0.5) * stride``;
  torchvision puts them on the cells' corners, ``i * stride``, so on a 128-px canvas the only
  P7 location would be the pixel (0, 0), which no box can hold strictly inside. Measured on
  the student alone (500 iterations): centred 39.0 AP, corners 30.8;
- FCOS's scale ranges (:class:`RangedFCOS`, the largest distance from a location to the box
  edges) overlap: P3 takes every object, as torchvision's default ranges would, and P4..P7
  also take the locations whose largest distance to the edges exceeds 16 / 24 / 32 / 40 px
  (medium and large digits). With torchvision's ranges every object
  goes to P3 and P4..P7 see only background, so no feature loss on them, and
  nothing scale-aware, can show; these ranges give every level positives at a cost of about
  3 AP for the student alone (35.9 vs 39.0). Disjoint ranges (each object on one level) left
  about half the objects with no positive location at all and cost 15 AP;
- the heads keep torchvision's ``GroupNorm(32, C)``, so the FPN width C must be a multiple of
  32. With the student's 32 channels each group is one channel, and on the 1 x 1 P7 map a group
  holds a single value, which normalisation sets to 0: its head turns that map into a constant,
  so the student's P7 predictions are input-independent, while its P7
  features (what the feature losses see) are not. Fewer groups (16 or 4) avoid that but
  trained far worse here (8.7 and 13.2 AP against 23.8 with 32 groups, same ranges).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .._validation import plural

__all__ = [
    "DETECTORS",
    "LEVEL_NAMES",
    "STRIDES",
    "STUDENT",
    "TEACHER",
    "BackboneConfig",
    "CellCenterAnchorGenerator",
    "DetectorConfig",
    "RangedFCOS",
    "SmallBackboneFPN",
    "build_detector",
    "capture_matches",
    "num_parameters",
    "positives_per_level",
]

DETECTORS = ("fcos", "retinanet")
LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class BackboneConfig:
    """A plain conv-BN-ReLU backbone: one stage per stride 2, 4, 8, 16, 32; the FPN reads the
    last three stages (C3, C4, C5) and adds P6, P7 from P5."""

    widths: tuple[int, ...] = (32, 32, 64, 128, 256)
    convs_per_stage: int = 2
    fpn_channels: int = 64
    head_convs: int = 4


TEACHER = BackboneConfig((32, 32, 64, 128, 256), 2, 64, 4)
STUDENT = BackboneConfig((16, 16, 32, 64, 128), 1, 32, 4)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines a detector of the demo (``asdict`` keys the teacher cache)."""

    kind: str = "fcos"
    num_classes: int = 10
    canvas: int = 128
    backbone: BackboneConfig = field(default_factory=lambda: TEACHER)
    # FCOS: per level, the range of a location's largest distance to the box edges (pixels)
    regress_ranges: tuple[tuple[float, float], ...] = ((0, 64), (16, 128), (24, 128), (32, 1e8), (40, 1e8))
    center_radius: float = 1.5  # FCOS: centre-sampling half-width, in anchor sizes (anchor size = stride)
    retina_sizes: tuple[float, ...] = (8.0, 14.0, 24.0, 40.0, 64.0)  # RetinaNet: base anchor side per level
    score_thresh: float = 0.05
    detections_per_img: int = 100

    def to_dict(self) -> dict:
        return asdict(self)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SmallBackboneFPN(nn.Module):
    """(N, 1, H, W) -> OrderedDict of five (N, fpn_channels, H/s, W/s) maps, s = 8, 16, 32, 64, 128."""

    def __init__(self, cfg: BackboneConfig, in_channels: int = 1) -> None:
        super().__init__()
        if len(cfg.widths) != 5:
            raise ValueError(f"widths must name 5 stages (strides 2..32), got {cfg.widths}")
        stages = []
        cin = in_channels
        for w in cfg.widths:
            layers = [_conv_bn_relu(cin, w, 2)] + [_conv_bn_relu(w, w, 1) for _ in range(cfg.convs_per_stage - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        c = cfg.fpn_channels
        self.fpn = FeaturePyramidNetwork(list(cfg.widths[2:]), c, extra_blocks=LastLevelP6P7(c, c))
        self.out_channels = c

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 2:
                feats[f"c{i + 1}"] = x
        return self.fpn(feats)


class CellCenterAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with anchors centred in their cells and unrounded sizes.

    torchvision puts the anchor of cell ``i`` at ``i * stride`` (the cell's corner), so on a
    small canvas the only P7 location is the pixel (0, 0); here it is ``(i + 0.5) * stride``,
    the centre of the cell the feature describes. Sizes may be fractional.
    """

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),  # noqa: B008  (torchvision's signature)
    ) -> Tensor:
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        ws = (1 / h_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales_t[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
        anchors = super().grid_anchors(grid_sizes, strides)
        out = []
        for a, (sh, sw) in zip(anchors, strides):
            offset = torch.stack([sw, sh, sw, sh]).to(a.dtype) / 2
            out.append(a + offset)
        return out


class RangedFCOS(FCOS):
    """torchvision's FCOS with explicit per-level regression ranges (mmdetection's ``regress_ranges``).

    torchvision derives level l's range of the largest location-to-edge distance from the
    anchor size, ``(4 a_l, 8 a_l)``: disjoint ranges, and with ``a_l = stride`` every object of
    a 128-px canvas lands on P3. Here the ranges are given and may overlap, so an object can be
    positive on several levels (duplicates across levels meet in the NMS). The matching is
    torchvision's otherwise: centre sampling (``center_sampling_radius`` anchor sizes), the
    location strictly inside the box, the smallest box wins.
    """

    def __init__(self, *args, regress_ranges: Sequence[tuple[float, float]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.regress_ranges = tuple((float(lo), float(hi)) for lo, hi in regress_ranges)

    def compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level):
        if len(num_anchors_per_level) != len(self.regress_ranges):
            raise ValueError(
                f"{plural(len(num_anchors_per_level), 'level')} but regress_ranges has "
                f"{plural(len(self.regress_ranges), 'entry', 'entries')}"
            )
        matched_idxs = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            if targets_per_image["boxes"].numel() == 0:
                matched_idxs.append(
                    torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device)
                )
                continue
            gt_boxes = targets_per_image["boxes"]
            gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
            anchor_centers = (anchors_per_image[:, :2] + anchors_per_image[:, 2:]) / 2
            anchor_sizes = anchors_per_image[:, 2] - anchors_per_image[:, 0]
            match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(dim=2).values < (
                self.center_sampling_radius * anchor_sizes[:, None]
            )
            x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
            x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
            dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
            match &= dist.min(dim=2).values > 0
            bounds = torch.tensor(self.regress_ranges, dtype=dist.dtype, device=dist.device)
            bounds = bounds.repeat_interleave(torch.tensor(num_anchors_per_level, device=dist.device), dim=0)
            dist = dist.max(dim=2).values
            match &= (dist > bounds[:, :1]) & (dist < bounds[:, 1:])
            gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
            match = match.to(torch.float32) * (1e8 - gt_areas[None, :])
            min_values, matched_idx = match.max(dim=1)
            matched_idx[min_values < 1e-5] = -1
            matched_idxs.append(matched_idx)
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)


def build_detector(cfg: DetectorConfig) -> nn.Module:
    """A torchvision FCOS or RetinaNet for ``cfg`` (train mode; random init, seeded by the caller)."""
    if cfg.kind not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {cfg.kind!r}")
    backbone = SmallBackboneFPN(cfg.backbone)
    c = backbone.out_channels
    if c % 32:
        raise ValueError(f"fpn_channels must be a multiple of 32 (GroupNorm(32, C) of the heads), got {c}")
    common = dict(
        min_size=cfg.canvas,
        max_size=cfg.canvas,
        image_mean=[0.5],
        image_std=[0.25],
        score_thresh=cfg.score_thresh,
        detections_per_img=cfg.detections_per_img,
    )
    if cfg.kind == "fcos":
        anchors = CellCenterAnchorGenerator(tuple((float(s),) for s in STRIDES), ((1.0,),) * len(STRIDES))
        head = FCOSHead(c, 1, cfg.num_classes, cfg.backbone.head_convs)
        return RangedFCOS(
            backbone,
            cfg.num_classes,
            anchor_generator=anchors,
            head=head,
            center_sampling_radius=cfg.center_radius,
            regress_ranges=cfg.regress_ranges,
            **common,
        )
    scales = tuple(tuple(s * 2 ** (k / 3) for k in range(3)) for s in cfg.retina_sizes)
    anchors = CellCenterAnchorGenerator(scales, ((0.5, 1.0, 2.0),) * len(scales))
    head = RetinaNetHead(
        c, anchors.num_anchors_per_location()[0], cfg.num_classes, norm_layer=partial(nn.GroupNorm, 32)
    )
    return RetinaNet(backbone, cfg.num_classes, anchor_generator=anchors, head=head, **common)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextmanager
def capture_matches(model: nn.Module):
    """Record the ``matched_idxs`` torchvision's matcher hands to ``model.head.compute_loss``.

    Yields a list that receives, per call, the list of per-image (num_anchors,) tensors
    (-1 background, -2 ignored for RetinaNet, else the index of the matched box). The
    detector's own assignment code runs unchanged; only the head's loss call is observed.
    """
    calls: list[list[Tensor]] = []
    original = model.head.compute_loss

    def observed(targets, head_outputs, anchors, matched_idxs):
        calls.append([m.detach().clone() for m in matched_idxs])
        return original(targets, head_outputs, anchors, matched_idxs)

    model.head.compute_loss = observed
    try:
        yield calls
    finally:
        del model.head.compute_loss  # back to the class's method


@torch.no_grad()
def positives_per_level(
    model: nn.Module, targets: Sequence[dict[str, Tensor]], canvas: int, batch_size: int = 256
) -> dict[str, object]:
    """How torchvision's own matcher assigns ``targets`` to the FPN levels of ``model``.

    Runs the detector's ``compute_loss`` on zero head outputs of the right shapes (no forward
    pass), observing the matched indices. Returns the positive locations per level, the
    objects with at least one positive per level, and the objects with none (no location is trained
    to detect such an object).
    """
    sizes = [math.ceil(canvas / s) for s in STRIDES]
    a = model.anchor_generator.num_anchors_per_location()[0]
    k = model.head.classification_head.num_classes
    per_level = [h * h * a for h in sizes]
    total = sum(per_level)
    bounds = [0, *torch.tensor(per_level).cumsum(0).tolist()]
    positives = [0] * len(sizes)
    objects_at = [0] * len(sizes)
    unmatched = 0
    num_objects = 0
    for start in range(0, len(targets), batch_size):
        chunk = [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets[start : start + batch_size]]
        n = len(chunk)
        feats = [torch.zeros(n, 1, h, h) for h in sizes]
        images = ImageList(torch.zeros(n, 1, canvas, canvas), [(canvas, canvas)] * n)
        anchors = model.anchor_generator(images, feats)
        head_outputs = {
            "cls_logits": torch.zeros(n, total, k),
            "bbox_regression": torch.zeros(n, total, 4),
            "bbox_ctrness": torch.zeros(n, total, 1),
        }
        with capture_matches(model) as calls:
            if isinstance(model, FCOS):
                model.compute_loss(chunk, head_outputs, anchors, [h * h for h in sizes])
            else:
                model.compute_loss(chunk, head_outputs, anchors)
        for t, m in zip(chunk, calls[0]):
            nb = len(t["boxes"])
            num_objects += nb
            hit = torch.zeros(nb, dtype=torch.bool)
            for lvl in range(len(sizes)):
                ml = m[bounds[lvl] : bounds[lvl + 1]]
                pos = ml[ml >= 0]
                positives[lvl] += pos.numel()
                ids = torch.unique(pos)
                objects_at[lvl] += ids.numel()
                hit[ids] = True
            unmatched += int((~hit).sum())
    return {
        "levels": list(LEVEL_NAMES),
        "positive_locations": positives,
        "objects_with_positives": objects_at,
        "objects": num_objects,
        "objects_without_positive": unmatched,
    }
