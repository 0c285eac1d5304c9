"""The detectron2 recipe of docs/guides/detectron2.md on real (tiny, randomly initialised) models.

RetinaNet (dense: FPN features and class logits) and Faster R-CNN with FPN (features only),
built from detectron2's config on the CPU, with no downloads. detectron2 is not on the package
index: CI installs a wheel built from its source (docs/guides/detectron2.md says how); where it is
not installed, these tests skip.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip(
    "detectron2.modeling",
    reason="detectron2 is not installed: it is not on the package index, build it from source "
    "(docs/guides/detectron2.md) to run these tests",
)

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from einops import rearrange

from famkd_losses import FAMKDLoss, FGDLoss, MGDLoss

K = 3  # classes
A = 9  # RetinaNet anchors per cell: 3 sizes x 3 aspect ratios
PADDED = (128, 128)  # both images padded to a multiple of 32 (the FPN's size_divisibility)
RETINA_SIDES = [16, 8, 4, 2, 1]  # p3-p7 on the padded 128 x 128 input
RCNN_SIDES = [32, 16, 8, 4, 2]  # p2-p6


def _cfg(arch: str, fpn_channels: int):
    """A ResNet-18 FPN detector from detectron2's defaults, set by hand (no model-zoo yaml)."""
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]  # keeps the random network's activations moderate
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # required for R18/R34
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    if arch == "RetinaNet":
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = K
        cfg.MODEL.RETINANET.NUM_CONVS = 1
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in (8, 16, 32, 64, 128)]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200, 50
        cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 64
    return cfg


def _model(arch: str, fpn_channels: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(_cfg(arch, fpn_channels))  # random weights, train mode


def _batched_inputs(seed: int = 0) -> list[dict]:
    """Two images of different sizes, as detectron2's DatasetMapper gives them (BGR 0-255, CHW)."""
    g = torch.Generator().manual_seed(seed)
    items = [
        ((96, 128), [[4.0, 6.0, 40.0, 50.0], [50.0, 20.0, 120.0, 90.0]], [0, 2]),
        ((128, 80), [[10.0, 12.0, 70.0, 100.0]], [1]),
    ]
    out = []
    for (h, w), boxes, classes in items:
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor(boxes))
        instances.gt_classes = torch.tensor(classes)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).float()
        out.append({"image": image, "instances": instances})
    return out


# --- the recipe's code, as in the guide -------------------------------------------------------


def teacher_tensors(teacher, batched_inputs):
    """Dense detector teacher: FPN features, class logits and the padded input size, no graph."""
    teacher.eval()
    with torch.no_grad():
        images = teacher.preprocess_image(batched_inputs)
        feats = teacher.backbone(images.tensor)
        feats = [feats[f] for f in teacher.head_in_features]
        cls_logits = teacher.head(feats)[0]
    return feats, cls_logits, tuple(images.tensor.shape[-2:])


def gt_boxes(batched_inputs, device):
    """x1y1x2y2 per image, in the padded input's pixels (ImageList pads at the bottom and right)."""
    return [x["instances"].gt_boxes.tensor.to(device) for x in batched_inputs]


def tap_dense_student(student, captured):
    return [
        student.head.register_forward_pre_hook(lambda m, args: captured.update(feats=list(args[0]))),
        student.head.register_forward_hook(lambda m, args, out: captured.update(logits=list(out[0]))),
    ]


def teacher_backbone(teacher, batched_inputs):
    """R-CNN teacher: the FPN dict ("p2" to "p6") and the padded input size, no graph."""
    teacher.eval()
    with torch.no_grad():
        images = teacher.preprocess_image(batched_inputs)
        return teacher.backbone(images.tensor), tuple(images.tensor.shape[-2:])


# --- helpers ----------------------------------------------------------------------------------


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(now: dict, before: dict) -> bool:
    return any(not torch.equal(now[k], before[k]) for k in before)


def test_retinanet_taps_and_logits_layout() -> None:
    """The head's input and first output are the FPN levels and (N, A*K, H, W) logits, channel a*K + k."""
    model = _model("RetinaNet", 32, seed=0)
    inputs = _batched_inputs()
    captured, seen = {}, {}
    handles = tap_dense_student(model, captured)
    handles.append(model.backbone.register_forward_pre_hook(lambda m, args: seen.update(padded=args[0])))
    handles.append(model.backbone.register_forward_hook(lambda m, args, out: seen.update(fpn=out)))
    losses_fn, label_fn = model.losses, model.label_anchors  # what detectron2's own losses receive

    def losses(anchors, pred_logits, *rest):
        seen["flat"] = pred_logits
        return losses_fn(anchors, pred_logits, *rest)

    def label_anchors(anchors, gt_instances):
        seen["gt"] = [g.gt_boxes.tensor for g in gt_instances]
        return label_fn(anchors, gt_instances)

    model.losses, model.label_anchors = losses, label_anchors
    with EventStorage():
        model(inputs)
    for h in handles:
        h.remove()

    assert model.head_in_features == ["p3", "p4", "p5", "p6", "p7"]
    feats, logits = captured["feats"], captured["logits"]
    assert [tuple(f.shape) for f in feats] == [(2, 32, s, s) for s in RETINA_SIDES]
    assert all(f is seen["fpn"][k] for f, k in zip(feats, model.head_in_features, strict=True))
    assert [tuple(z.shape) for z in logits] == [(2, A * K, s, s) for s in RETINA_SIDES]
    assert all(z.requires_grad for z in feats + logits)
    for z, flat in zip(logits, seen["flat"], strict=True):
        torch.testing.assert_close(permute_to_N_HWA_K(z, K), flat, rtol=0, atol=0)
        torch.testing.assert_close(rearrange(z, "n (a k) h w -> n (h w a) k", k=K), flat, rtol=0, atol=0)

    # FGD's inputs: the padded size is the backbone's input, padding only at the bottom and
    # right, so the boxes the model matches anchors to are already in the padded input's pixels
    padded = seen["padded"]
    assert tuple(padded.shape[-2:]) == PADDED
    for x, p in zip(inputs, padded, strict=True):
        h, w = x["image"].shape[-2:]
        torch.testing.assert_close(p[:, :h, :w], (x["image"] - model.pixel_mean) / model.pixel_std)
        assert (p[:, h:, :] == 0).all() and (p[:, :, w:] == 0).all()
    for a, b in zip(gt_boxes(inputs, feats[0].device), seen["gt"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # the tapped logits keep the graph: a logits-only loss reaches cls_score, not bbox_pred
    t_feats, t_logits, _ = teacher_tensors(_model("RetinaNet", 32, seed=1), inputs)
    FAMKDLoss([32] * 5, [32] * 5, num_classes=K, alpha=0.0)(feats, t_feats, logits, t_logits).backward()
    assert model.head.cls_score.weight.grad.abs().sum() > 0
    assert model.head.bbox_pred.weight.grad is None


def test_retinanet_training_step() -> None:
    teacher = _model("RetinaNet", 64, seed=0)
    student = _model("RetinaNet", 32, seed=1)  # narrower FPN: the losses' align convs are used
    inputs = _batched_inputs(seed=1)
    kd = FAMKDLoss([32] * 5, [64] * 5, num_classes=K)
    mgd = MGDLoss([32] * 5, [64] * 5)
    fgd = FGDLoss([32] * 5, [64] * 5)
    losses = nn.ModuleList([kd, mgd, fgd])
    aligns = [m.align for m in [*kd.feature_losses, *mgd.levels, *fgd.levels]]
    assert all(isinstance(a, nn.Conv2d) for a in aligns)  # 32 -> 64 channels, one per level and loss
    optimizer = torch.optim.SGD([*student.parameters(), *losses.parameters()], lr=0.01)
    teacher_before, student_before, losses_before = _state(teacher), _state(student), _state(losses)

    captured = {}
    handles = tap_dense_student(student, captured)
    t_feats, t_logits, image_size = teacher_tensors(teacher, inputs)
    with EventStorage():  # detectron2's trainer opens one; a plain loop must too
        det_losses = student(inputs)
    for h in handles:
        h.remove()
    s_feats, s_logits = captured["feats"], captured["logits"]

    assert image_size == PADDED
    assert [f.shape[1] for f in s_feats] == [32] * 5 and [f.shape[1] for f in t_feats] == [64] * 5
    assert [z.shape for z in s_logits] == [z.shape for z in t_logits]
    assert not any(t.requires_grad for t in t_feats + t_logits)
    assert set(det_losses) == {"loss_cls", "loss_box_reg"}

    loss = (
        sum(det_losses.values())
        + kd(s_feats, t_feats, s_logits, t_logits)
        + mgd(s_feats, t_feats)
        + fgd(s_feats, t_feats, gt_boxes(inputs, t_feats[0].device), image_size)
    )
    assert torch.isfinite(loss) and loss.dim() == 0
    assert math.isfinite(kd.last_terms(as_float=True)["logits"])
    fgd_terms = fgd.last_terms(as_float=True)
    assert all(math.isfinite(v) for v in fgd_terms.values())
    assert fgd_terms["level0/fg"] > 0 and fgd_terms["level0/bg"] > 0  # the boxes mark part of p3
    optimizer.zero_grad()
    loss.backward()
    # each loss's align conv of p3 learns (on 1 x 1 maps MGD may mask every cell: no gradient)
    for m in (kd.feature_losses[0], mgd.levels[0], fgd.levels[0]):
        assert m.align.weight.grad.abs().sum() > 0
    optimizer.step()

    assert _changed(_state(student), student_before)
    assert _changed(_state(losses), losses_before)
    assert not _changed(_state(teacher), teacher_before)
    assert all(p.grad is None for p in teacher.parameters())


def test_faster_rcnn_feature_distillation_step() -> None:
    teacher = _model("GeneralizedRCNN", 64, seed=0)
    student = _model("GeneralizedRCNN", 32, seed=1)
    inputs = _batched_inputs(seed=2)
    kd = FAMKDLoss([32] * 5, [64] * 5)
    mgd = MGDLoss([32] * 5, [64] * 5, ratio=0.45, alpha=5e-7)  # two-stage values
    fgd = FGDLoss([32] * 5, [64] * 5, alpha=5e-5, beta=2.5e-5, gamma=5e-5, lam=5e-7)
    losses = nn.ModuleList([kd, mgd, fgd])
    optimizer = torch.optim.SGD([*student.parameters(), *losses.parameters()], lr=0.01)
    teacher_before, student_before, losses_before = _state(teacher), _state(student), _state(losses)

    captured = {}
    handle = student.backbone.register_forward_hook(lambda m, args, out: captured.update(feats=out))
    t_feats, image_size = teacher_backbone(teacher, inputs)
    with EventStorage():
        det_losses = student(inputs)
    handle.remove()
    s_feats = captured["feats"]

    assert image_size == PADDED
    assert list(s_feats) == list(t_feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert [tuple(f.shape) for f in s_feats.values()] == [(2, 32, s, s) for s in RCNN_SIDES]
    assert [tuple(f.shape) for f in t_feats.values()] == [(2, 64, s, s) for s in RCNN_SIDES]
    assert set(det_losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}

    loss = (
        sum(det_losses.values())
        + kd(s_feats, t_feats)
        + mgd(s_feats, t_feats)
        + fgd(s_feats, t_feats, gt_boxes(inputs, t_feats["p2"].device), image_size)
    )
    assert torch.isfinite(loss) and loss.dim() == 0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    assert _changed(_state(student), student_before)
    assert _changed(_state(losses), losses_before)
    assert not _changed(_state(teacher), teacher_before)
    assert all(p.grad is None for p in teacher.parameters())
