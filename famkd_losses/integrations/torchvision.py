"""FPN features and dense class logits from torchvision's FCOS and RetinaNet.

The teacher runs under `teacher_outputs` (eval mode, no graph, no post-processing); the
student's tensors are tapped with forward hooks while it computes its own detection losses::

    t = teacher_outputs(teacher, images, targets)
    with StudentTaps(student) as taps:
        det_losses = student(images, targets)          # train mode, as usual
    s = taps.outputs()                                  # graph attached
    loss = sum(det_losses.values()) + kd(s.features, t.features, s.cls_logits, t.cls_logits)

Works with any model that has torchvision's layout: ``model.transform`` returning
``(ImageList, targets)``, ``model.backbone`` returning a mapping of levels (or one tensor), and
``model.head.classification_head`` returning ``(N, sum_l H_l W_l A, K)`` logits in torchvision's
order (or, without ``classification_head``, ``model.head`` returning ``{"cls_logits": ...}``).
torchvision is imported on first use only: ``pip install famkd-losses[torchvision]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._outputs import DetectorOutputs

__all__ = ["DetectorOutputs", "StudentTaps", "teacher_outputs"]


def _require_torchvision() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "famkd_losses.integrations.torchvision needs torchvision: pip install famkd-losses[torchvision]"
        ) from err


def _check_model(model: nn.Module) -> None:
    missing = [name for name in ("transform", "backbone", "head") if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"model must be a torchvision FCOS/RetinaNet-like detector with .transform, .backbone and .head; "
            f"{type(model).__name__} has no {', '.join('.' + m for m in missing)}"
        )


def _classification_module(model: nn.Module) -> tuple[nn.Module, bool]:
    """The module whose output holds the flat class logits, and whether it is the whole head (a dict)."""
    head = model.head
    if hasattr(head, "classification_head"):
        return head.classification_head, False
    return head, True


def _flat_logits(output: Any, whole_head: bool) -> Tensor:
    logits = output["cls_logits"] if whole_head else output
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError(
            f"the classification head must return (N, sum HWA, K) logits; got "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    return logits


def _feature_list(features: Tensor | Mapping[str, Tensor]) -> list[Tensor]:
    """The backbone's output as a list of levels, in insertion order (torchvision does the same)."""
    if isinstance(features, Tensor):
        return [features]
    return list(features.values())


def _dense_logits(flat: Tensor, features: Sequence[Tensor]) -> list[Tensor]:
    """(N, sum_l H_l W_l A, K) head output -> per level (N, A*K, H_l, W_l), channel a*K + k.

    Inverts torchvision's ``view(N, A, K, H, W).permute(0, 3, 4, 1, 2).reshape(N, HWA, K)`` per level.
    """
    n, p, k = flat.shape
    sizes = [(f.shape[-2], f.shape[-1]) for f in features]
    cells = sum(h * w for h, w in sizes)
    if cells == 0 or p % cells:
        raise ValueError(
            f"classification logits have {p} rows, not a multiple of the {cells} cells of the feature maps "
            f"{[tuple(s) for s in sizes]}: the head does not use one anchor count A for every level"
        )
    a = p // cells
    chunks = flat.split([h * w * a for h, w in sizes], dim=1)
    return [chunk.reshape(n, h, w, a * k).permute(0, 3, 1, 2).contiguous() for chunk, (h, w) in zip(chunks, sizes)]


def _boxes(targets: Sequence[Mapping[str, Tensor]] | None, batch: Tensor) -> list[Tensor]:
    if targets is None:
        return [batch.new_zeros((0, 4)) for _ in range(batch.shape[0])]
    return [t["boxes"] if "boxes" in t else batch.new_zeros((0, 4)) for t in targets]


def teacher_outputs(
    model: nn.Module,
    images: Sequence[Tensor] | Tensor,
    targets: Sequence[Mapping[str, Tensor]] | None = None,
) -> DetectorOutputs:
    """Teacher features and dense class logits, without post-processing or NMS.

    Runs ``model.transform -> model.backbone -> model.head.classification_head`` in eval mode
    (BatchNorm uses its running statistics and they are not updated) under ``torch.no_grad()``.
    Every submodule's train/eval flag is restored afterwards. ``torch.inference_mode`` is not used:
    its tensors could not be used beside the student's graph.

    Args:
        model: a torchvision ``FCOS`` or ``RetinaNet`` (or a model with the same layout).
        images: list of ``(C, H, W)`` float images, or an ``(N, C, H, W)`` batch, as the model takes them.
        targets: optional list of dicts with ``"boxes"`` ``(n_i, 4)`` x1y1x2y2 in the original images'
            pixels; they come back resized like the images in ``boxes``.

    Returns:
        `DetectorOutputs` with no graph (``requires_grad=False``).
    """
    _require_torchvision()
    _check_model(model)
    cls_module, whole_head = _classification_module(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            image_list, resized = model.transform(images, targets)
            features = _feature_list(model.backbone(image_list.tensors))
            flat = _flat_logits(cls_module(features), whole_head)
            cls_logits = _dense_logits(flat, features)
    finally:
        for m, training in modes:
            m.training = training
    batch = image_list.tensors
    return DetectorOutputs(features, cls_logits, (int(batch.shape[-2]), int(batch.shape[-1])), _boxes(resized, batch))


class StudentTaps:
    """Forward hooks that collect a detector's `DetectorOutputs` while it runs its own forward.

    ::

        with StudentTaps(student) as taps:
            det_losses = student(images, targets)   # train mode: torchvision computes its losses
        out = taps.outputs()   # features and dense logits with the graph attached

    Hooks go on ``model.transform`` (image size, resized targets), ``model.backbone`` (FPN levels) and
    ``model.head.classification_head`` ((N, sum HWA, K) logits, turned into (N, A*K, H_l, W_l) maps).
    They are removed when the block exits, exceptions included. If the model runs several times inside
    the block, `outputs` gives the last run. Not re-entrant; a finished instance can be entered again.
    """

    def __init__(self, model: nn.Module) -> None:
        _require_torchvision()
        _check_model(model)
        self.model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: dict[str, Any] = {}

    def __enter__(self) -> StudentTaps:
        if self._handles:
            raise RuntimeError("this StudentTaps is already active (it is not re-entrant)")
        self._captured = {}
        cls_module, whole_head = _classification_module(self.model)

        def on_transform(_module: nn.Module, _args: Any, output: Any) -> None:
            image_list, targets = output
            self._captured = {"batch": image_list.tensors, "targets": targets}  # a new forward starts

        def on_backbone(_module: nn.Module, _args: Any, output: Any) -> None:
            self._captured["features"] = _feature_list(output)

        def on_classification(_module: nn.Module, _args: Any, output: Any) -> None:
            self._captured["flat_logits"] = _flat_logits(output, whole_head)

        try:
            self._handles.append(self.model.transform.register_forward_hook(on_transform))
            self._handles.append(self.model.backbone.register_forward_hook(on_backbone))
            self._handles.append(cls_module.register_forward_hook(on_classification))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def outputs(self) -> DetectorOutputs:
        """The last forward's `DetectorOutputs` (graph attached in train mode)."""
        missing = [k for k in ("batch", "features", "flat_logits") if k not in self._captured]
        if missing:
            raise RuntimeError(
                "no complete forward of the model ran inside the StudentTaps block "
                f"(missing: {', '.join(missing)}); call the model inside `with StudentTaps(model) as taps:`"
            )
        features = self._captured["features"]
        batch = self._captured["batch"]
        return DetectorOutputs(
            features=list(features),
            cls_logits=_dense_logits(self._captured["flat_logits"], features),
            image_size=(int(batch.shape[-2]), int(batch.shape[-1])),
            boxes=_boxes(self._captured["targets"], batch),
        )
