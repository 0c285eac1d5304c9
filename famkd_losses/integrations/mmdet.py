"""The losses in MMEngine's ``MODELS`` registry, for mmdetection 3.x and mmrazor 1.x configs.

Importing this module registers every loss of the package under its class name
(``FAMKDLoss``, ``ScaleAwareMaskedFeatureLoss``, ``MaskedLogitsLoss``, ``MGDLoss``,
``FGDLoss``, ``PKDLoss``, ``CWDLoss``, ``KDLoss``) in ``mmengine.registry.MODELS``, the root of
the registry tree that mmdetection's and mmrazor's ``MODELS`` registries are children of. In a
config::

    custom_imports = dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False)

    distill_losses = dict(loss_famkd=dict(type="FAMKDLoss", student_channels=[256] * 5,
                                          teacher_channels=[256] * 5, num_classes=80))

``mmengine.Config.fromfile`` (and so ``tools/train.py``) performs the import. Without mmengine
the import still succeeds and registers nothing; `register` then raises an ``ImportError``
naming the extra to install: ``pip install famkd-losses[mmdet]``.

How mmrazor calls a loss: ``ConfigurableDistiller.compute_distill_losses`` builds one keyword
argument per entry of ``loss_forward_mappings[name]`` (the recorded tensor, or tuple/list of
tensors) and calls ``loss(**kwargs)``; at construction it checks that every key is a parameter of
``loss.forward``. So the mapping keys are our ``forward`` argument names: ``s_feats``,
``t_feats``, ``s_logits``, ``t_logits`` (``s_feat``/``t_feat`` for
``ScaleAwareMaskedFeatureLoss``). A ``ModuleOutputs`` recorder on ``neck`` records the FPN tuple
(pass it whole to a multi-level loss, or one level with ``data_idx``); one on ``bbox_head`` of a
RetinaNet records ``(cls_scores, bbox_preds)``, so ``data_idx=0`` is the list of per-level class
logits. Losses built with int channels are single-level and take single tensors.

``FGDLoss`` is registered as `MMDetFGDLoss`, which also accepts ``data_samples=`` (mmdetection's
``DetDataSample`` list, recorded with ``ModuleInputs`` on the detector, ``data_idx=1``) and reads
the ground-truth boxes and ``batch_input_shape`` from it.

Name clashes: mmrazor's own registry (scope ``mmrazor``) also has ``MGDLoss`` and ``PKDLoss``,
and a config under ``_scope_="mmrazor"`` finds those first. Write ``type="mmengine.MGDLoss"`` (or
``"mmengine.PKDLoss"``) for ours. The other six names are not defined by mmrazor 1.0 or mmdet 3.3.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .. import losses as _losses
from ..losses import (
    FGDLoss,
)

__all__ = [
    "INSTALL_HINT",
    "LOSS_NAMES",
    "BoxesFromDataSamples",
    "MMDetFGDLoss",
    "REGISTERED_ON_IMPORT",
    "boxes_from_data_samples",
    "for_mmdet",
    "loss_classes",
    "register",
]

INSTALL_HINT = "pip install famkd-losses[mmdet]"

LOSS_NAMES: tuple[str, ...] = tuple(_losses.__all__)  # every loss class of the package


def boxes_from_data_samples(data_samples: Sequence[Any]) -> tuple[list[Tensor], tuple[int, int]]:
    """Ground-truth boxes and the padded input size from mmdetection ``DetDataSample``s.

    Returns ``gt_instances.bboxes`` per image (``(n_i, 4)`` x1y1x2y2 in the pixels of the resized,
    padded input; mmdet's ``HorizontalBoxes`` are unwrapped with ``.tensor``) and the
    ``batch_input_shape`` ``(H, W)`` that mmdet's ``DetDataPreprocessor`` writes into every
    sample's metainfo. Duck-typed: needs no mmdet import.
    """
    if isinstance(data_samples, (str, bytes)) or not isinstance(data_samples, Sequence) or not data_samples:
        raise TypeError(
            f"data_samples must be a non-empty list of mmdet DetDataSample, got {type(data_samples).__name__}"
        )
    boxes: list[Tensor] = []
    sizes: set[tuple[int, int]] = set()
    for i, sample in enumerate(data_samples):
        gt = getattr(sample, "gt_instances", None)
        if gt is None or not hasattr(gt, "bboxes"):
            raise ValueError(
                f"data_samples[{i}] has no gt_instances.bboxes; record the training data samples "
                "(ModuleInputs on the detector, data_idx=1) or pass boxes= yourself"
            )
        b = gt.bboxes
        b = getattr(b, "tensor", b)  # mmdet.structures.bbox.HorizontalBoxes
        if not isinstance(b, Tensor):
            raise TypeError(f"data_samples[{i}].gt_instances.bboxes must be a tensor, got {type(b).__name__}")
        boxes.append(b)
        meta = getattr(sample, "metainfo", None) or {}
        size = meta.get("batch_input_shape")
        if size is None:
            raise ValueError(
                f"data_samples[{i}] has no 'batch_input_shape' in its metainfo (mmdet's DetDataPreprocessor "
                "sets it); pass image_size=(H, W) of the padded input yourself"
            )
        sizes.add((int(size[0]), int(size[1])))
    if len(sizes) != 1:
        raise ValueError(f"data_samples disagree on batch_input_shape: {sorted(sizes)}")
    return boxes, sizes.pop()


class BoxesFromDataSamples:
    """Mixin for a loss that declares ``"boxes"`` among its inputs (``forward(s, t, boxes,
    image_size)``): it also takes mmdetection's ``data_samples``, from which the missing boxes and
    padded input size are read (`boxes_from_data_samples`)."""

    def forward(  # type: ignore[override]
        self,
        s_feats: Tensor | Sequence[Tensor],
        t_feats: Tensor | Sequence[Tensor],
        boxes: Sequence[Tensor] | None = None,
        image_size: Sequence[int] | None = None,
        data_samples: Sequence[Any] | None = None,
    ) -> Tensor:
        if boxes is None or image_size is None:
            if data_samples is None:
                raise ValueError(
                    f"{_loss_name(self)} needs the ground-truth boxes and the padded input size: "
                    "pass boxes= and image_size=, or data_samples= (mmdet DetDataSample list; in mmrazor map it "
                    "from a ModuleInputs recorder on the detector with data_idx=1)"
                )
            ds_boxes, ds_size = boxes_from_data_samples(data_samples)
            boxes = ds_boxes if boxes is None else boxes
            image_size = ds_size if image_size is None else image_size
        return super().forward(s_feats, t_feats, boxes, image_size)  # type: ignore[misc]


def _loss_name(loss: object) -> str:
    return next(c.__name__ for c in type(loss).__mro__ if not issubclass(c, BoxesFromDataSamples))


class MMDetFGDLoss(BoxesFromDataSamples, FGDLoss):
    """`FGDLoss` that also takes mmdetection's ``data_samples`` (registered as ``"FGDLoss"``).

    ``forward(s_feats, t_feats, boxes=None, image_size=None, data_samples=None)``: give either
    ``boxes`` and ``image_size`` (as `FGDLoss`), or ``data_samples``, from which the missing ones
    are read (`boxes_from_data_samples`). Everything else is `FGDLoss`.
    """


def for_mmdet(cls: type) -> type:
    """The class registered for loss ``cls``: ``cls`` itself, or, where it declares ``"boxes"``
    among its inputs, a subclass that also reads them from ``data_samples``."""
    if "boxes" not in getattr(cls, "inputs", ()):
        return cls
    if cls is FGDLoss:
        return MMDetFGDLoss
    return type(f"MMDet{cls.__name__}", (BoxesFromDataSamples, cls), {"__doc__": cls.__doc__})


def loss_classes() -> dict[str, type]:
    """The registered name of every loss and the class built for it."""
    return {name: for_mmdet(getattr(_losses, name)) for name in LOSS_NAMES}


def _mmengine_models() -> Any:
    try:
        from mmengine.registry import MODELS
    except ImportError as err:
        raise ImportError(f"famkd_losses.integrations.mmdet needs mmengine: {INSTALL_HINT}") from err
    return MODELS


def _same_class(a: Any, b: type) -> bool:
    """``a`` is ``b``, or the same class from a re-executed module (importlib.reload)."""
    return a is b or (
        isinstance(a, type)
        and getattr(a, "__module__", None) == b.__module__
        and getattr(a, "__qualname__", None) == b.__qualname__
    )


def register(registry: Any = None, force: bool = False) -> list[str]:
    """Register every loss under its class name in ``registry``; return the names.

    Args:
        registry: an mmengine ``Registry`` (default ``mmengine.registry.MODELS``, which
            mmdetection's and mmrazor's ``MODELS`` inherit from; a child registry works too).
        force: replace a *different* class already registered under one of the names. Without it
            such a clash raises ``KeyError`` before anything is registered.

    Idempotent: names already bound to our classes are left as they are (and returned).
    Raises ``ImportError`` (``pip install famkd-losses[mmdet]``) when mmengine is missing and no
    registry is given.
    """
    if registry is None:
        registry = _mmengine_models()
    if not (hasattr(registry, "register_module") and hasattr(registry, "module_dict")):
        raise TypeError(
            f"registry must be an mmengine Registry (with register_module and module_dict), got "
            f"{type(registry).__name__}"
        )
    classes = loss_classes()
    existing = registry.module_dict
    clashes = {
        name: existing[name]
        for name, cls in classes.items()
        if name in existing and not _same_class(existing[name], cls)
    }
    if clashes and not force:
        found = ", ".join(
            f"{n} -> {getattr(c, '__module__', '?')}.{getattr(c, '__name__', c)}" for n, c in clashes.items()
        )
        raise KeyError(
            f"registry {getattr(registry, 'name', '?')!r} (scope {getattr(registry, 'scope', '?')!r}) already holds "
            f"other classes under {found}; pass force=True to replace them, or register in mmengine's root MODELS "
            "(the default) and refer to ours as 'mmengine.<Name>'"
        )
    for name, cls in classes.items():
        if existing.get(name) is not cls:
            registry.register_module(name=name, module=cls, force=True)
    return list(classes)


def _register_on_import() -> list[str]:
    """Register in mmengine's MODELS when mmengine is importable; never fail the import."""
    if importlib.util.find_spec("mmengine") is None:
        return []
    try:
        return register()
    except Exception as err:  # a broken mmengine, or a clash: the module stays importable
        warnings.warn(
            f"famkd_losses.integrations.mmdet could not register the losses in mmengine's MODELS: {err}; "
            "call famkd_losses.integrations.mmdet.register() yourself",
            RuntimeWarning,
            stacklevel=2,
        )
        return []


REGISTERED_ON_IMPORT: list[str] = _register_on_import()
"""The names registered in ``mmengine.registry.MODELS`` when this module was imported (empty without mmengine)."""
