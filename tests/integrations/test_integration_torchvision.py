"""famkd_losses.integrations.torchvision on real (tiny, randomly initialised) FCOS and RetinaNet models."""

from __future__ import annotations

import importlib
import math
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

tv_detection = pytest.importorskip("torchvision.models.detection")

from einops import rearrange  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

from famkd_losses import FAMKDLoss, FGDLoss, MGDLoss  # noqa: E402
from famkd_losses.integrations.torchvision import DetectorOutputs, StudentTaps, teacher_outputs  # noqa: E402

K = 5  # classes
SIZE = 64  # the transform's min_size = max_size; levels P3-P7: 8, 4, 2, 1, 1


def _backbone(in_ch: int, widths: tuple[int, ...], fpn: int) -> BackboneWithFPN:
    """Strides 2, 4, 8, 16, 32 (conv-BN-ReLU each); C3-C5 into an FPN with P6, P7."""
    layers, c = OrderedDict(), in_ch
    for i, w in enumerate(widths):
        layers[f"layer{i}"] = nn.Sequential(nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        c = w
    return BackboneWithFPN(
        nn.Sequential(layers),
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=list(widths[2:]),
        out_channels=fpn,
        extra_blocks=LastLevelP6P7(fpn, fpn),
    )


def _detector(kind: str, *, fpn: int, widths: tuple[int, ...], in_ch: int) -> nn.Module:
    mean, std = [0.5] * in_ch, [0.25] * in_ch
    common = dict(min_size=SIZE, max_size=SIZE, image_mean=mean, image_std=std)
    if kind == "fcos":
        anchors = AnchorGenerator(((4,), (8,), (16,), (32,), (64,)), ((1.0,),) * 5)
        return tv_detection.FCOS(_backbone(in_ch, widths, fpn), K, anchor_generator=anchors, **common)
    sizes = tuple(tuple(round(s * 2 ** (i / 3)) for i in range(3)) for s in (6, 12, 24, 48, 96))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)  # 9 anchors per cell
    return tv_detection.RetinaNet(_backbone(in_ch, widths, fpn), K, anchor_generator=anchors, **common)


def _data(in_ch: int, side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(in_ch, side, side, generator=g) for _ in range(2)]
    boxes = [torch.tensor([[4.0, 6.0, 20.0, 30.0], [10.0, 12.0, 40.0, 44.0]]), torch.tensor([[2.0, 3.0, 30.0, 18.0]])]
    targets = [{"boxes": b, "labels": torch.randint(0, K, (len(b),), generator=g)} for b in boxes]
    return images, targets


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


KINDS = [("fcos", 1, 1), ("retinanet", 3, 9)]  # (kind, image channels, anchors per cell)


@pytest.mark.parametrize(("kind", "in_ch", "num_anchors"), KINDS)
def test_teacher_outputs(kind: str, in_ch: int, num_anchors: int) -> None:
    torch.manual_seed(0)
    teacher = _detector(kind, fpn=64, widths=(16, 16, 32, 32, 64), in_ch=in_ch)
    teacher.train()
    teacher.backbone.body.layer0[1].eval()  # a mixed-mode model: the flags come back one by one
    before = _state(teacher)
    images, targets = _data(in_ch, side=48)  # resized 48 -> 64 by the transform: boxes scale by 4/3

    dense = []  # the per-level cls_logits conv outputs, taken independently of the adapter
    handle = teacher.head.classification_head.cls_logits.register_forward_hook(lambda m, a, o: dense.append(o))
    out = teacher_outputs(teacher, images, targets)
    handle.remove()

    assert isinstance(out, DetectorOutputs)
    assert out.image_size == (SIZE, SIZE)
    sides = [8, 4, 2, 1, 1]
    assert [tuple(f.shape) for f in out.features] == [(2, 64, s, s) for s in sides]
    assert [tuple(z.shape) for z in out.cls_logits] == [(2, num_anchors * K, s, s) for s in sides]
    for got, want in zip(out.cls_logits, dense, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for want, got in zip(targets, out.boxes, strict=True):
        torch.testing.assert_close(got, want["boxes"] * SIZE / 48)
    assert all(not t.requires_grad and t.grad_fn is None for t in out.features + out.cls_logits)

    # the mode flags and every buffer (BatchNorm running statistics) are as before
    assert teacher.training and not teacher.backbone.body.layer0[1].training
    assert teacher.backbone.body.layer1[1].training
    for k, v in _state(teacher).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)

    # the same logits as the head's own flat (N, sum HWA, K) output, rearranged
    teacher.eval()
    with torch.no_grad():
        flat = teacher.head.classification_head(out.features)
    rows = [num_anchors * s * s for s in sides]
    for got, part, s in zip(out.cls_logits, flat.split(rows, dim=1), sides, strict=True):
        want = rearrange(part, "n (h w a) k -> n (a k) h w", h=s, w=s, a=num_anchors)
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    # StudentTaps on the same model in eval mode sees the same tensors; no targets: (0, 4) boxes
    with torch.no_grad(), StudentTaps(teacher) as taps:
        teacher(images)
    tapped, plain = taps.outputs(), teacher_outputs(teacher, images)
    for a, b in zip(tapped.features + tapped.cls_logits, plain.features + plain.cls_logits, strict=True):
        torch.testing.assert_close(a, b)
    assert tapped.image_size == plain.image_size == (SIZE, SIZE)
    assert [tuple(b.shape) for b in tapped.boxes] == [tuple(b.shape) for b in plain.boxes] == [(0, 4)] * 2


@pytest.mark.parametrize(("kind", "in_ch", "num_anchors"), KINDS)
def test_student_taps_training_step(kind: str, in_ch: int, num_anchors: int) -> None:
    torch.manual_seed(0)
    teacher = _detector(kind, fpn=64, widths=(16, 16, 32, 32, 64), in_ch=in_ch)
    student = _detector(kind, fpn=32, widths=(8, 8, 16, 16, 32), in_ch=in_ch)  # narrower: align convs
    student.train()
    images, targets = _data(in_ch, side=SIZE, seed=1)
    levels = 5
    kd = FAMKDLoss([32] * levels, [64] * levels, num_classes=K)
    mgd = MGDLoss([32] * levels, [64] * levels)
    fgd = FGDLoss([32] * levels, [64] * levels)
    losses = nn.ModuleList([kd, mgd, fgd])
    optimizer = torch.optim.SGD([*student.parameters(), *losses.parameters()], lr=0.1)
    teacher_before, student_before, losses_before = _state(teacher), _state(student), _state(losses)
    hooks_before = _hook_count(student)

    t = teacher_outputs(teacher, images, targets)
    with StudentTaps(student) as taps:
        det_losses = student(images, targets)
        assert _hook_count(student) == hooks_before + 3
    assert _hook_count(student) == hooks_before
    s = taps.outputs()

    assert s.image_size == t.image_size == (SIZE, SIZE)
    assert [f.shape[1] for f in s.features] == [32] * levels
    assert [tuple(z.shape) for z in s.cls_logits] == [tuple(z.shape) for z in t.cls_logits]
    assert s.cls_logits[0].shape[1] == num_anchors * K
    assert all(z.requires_grad for z in s.features + s.cls_logits)
    for a, b in zip(s.boxes, t.boxes, strict=True):
        torch.testing.assert_close(a, b)

    loss = (
        sum(det_losses.values())
        + kd(s.features, t.features, s.cls_logits, t.cls_logits)
        + mgd(s.features, t.features)
        + fgd(s.features, t.features, s.boxes, s.image_size)
    )
    assert torch.isfinite(loss) and loss.dim() == 0
    assert math.isfinite(kd.last_terms(as_float=True)["logits"])
    optimizer.zero_grad()
    loss.backward()
    # the distillation terms reach the student's head through the tapped logits
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    optimizer.step()

    def changed(now: dict, before: dict) -> bool:
        return any(not torch.equal(now[k], before[k]) for k in before)

    assert changed(_state(student), student_before)
    assert changed(_state(losses), losses_before)
    assert not changed(_state(teacher), teacher_before)
    assert all(p.grad is None for p in teacher.parameters())


def test_logits_only_distillation_reaches_the_head() -> None:
    """The dense logits keep the graph: a logits-only loss gives the cls_logits conv a gradient."""
    torch.manual_seed(0)
    teacher = _detector("retinanet", fpn=32, widths=(8, 8, 16, 16, 32), in_ch=3)
    student = _detector("retinanet", fpn=32, widths=(8, 8, 16, 16, 32), in_ch=3)
    images, targets = _data(3, side=SIZE)
    t = teacher_outputs(teacher, images, targets)
    with StudentTaps(student) as taps:
        student(images, targets)
    s = taps.outputs()
    kd = FAMKDLoss([32] * 5, [32] * 5, num_classes=K, alpha=0.0)
    kd(s.features, t.features, s.cls_logits, t.cls_logits).backward()
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    assert student.head.regression_head.bbox_reg.weight.grad is None


def test_hooks_removed_on_exception_and_errors() -> None:
    model = _detector("fcos", fpn=32, widths=(8, 8, 16, 16, 32), in_ch=1).train()
    images, _ = _data(1, side=SIZE)
    hooks = _hook_count(model)
    taps = StudentTaps(model)
    with pytest.raises(RuntimeError, match="no complete forward"):
        taps.outputs()
    with pytest.raises(AssertionError, match="targets should not be none"), taps:  # train mode needs targets
        model(images)
    assert _hook_count(model) == hooks
    with taps, pytest.raises(RuntimeError, match="not re-entrant"), taps:
        pass
    assert _hook_count(model) == hooks
    with pytest.raises(TypeError, match=r"\.transform"):
        teacher_outputs(nn.Linear(2, 2), images)


def test_import_without_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    import famkd_losses

    monkeypatch.setattr(famkd_losses, "integrations", famkd_losses.integrations)  # restored afterwards
    for name in [m for m in sys.modules if m.startswith("famkd_losses.integrations")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` now raises ImportError
    importlib.import_module("famkd_losses.integrations")
    module = importlib.import_module("famkd_losses.integrations.torchvision")  # lazy: importing works
    with pytest.raises(ImportError, match=r"pip install famkd-losses\[torchvision\]"):
        module.teacher_outputs(nn.Module(), [])
    with pytest.raises(ImportError, match=r"pip install famkd-losses\[torchvision\]"):
        module.StudentTaps(nn.Module())
