"""Distil a YOLO teacher into a YOLO student with ultralytics' own trainer and a famkd-losses loss.

    pip install "famkd-losses[ultralytics]"
    python examples/ultralytics_distill.py --data coco8.yaml --teacher yolov8s.pt --student yolov8n.yaml

``--teacher`` is any ultralytics detection checkpoint with the dataset's classes (train one
first with ``yolo train``); ``--student`` a model yaml (from scratch) or a checkpoint.
``--loss`` picks FAMKD (features + logits), MGD or FGD; the distillation term shows up as
``dis_loss`` in the progress bar and in ``results.csv``. Any other ``key=value`` arguments
go to ``YOLO.train`` (``epochs=100 imgsz=640 batch=16 device=0`` ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from famkd_losses import FAMKDLoss, FGDLoss, MGDLoss


def loss_factory(name: str, alpha: float | None, beta: float | None):
    """``(student_channels, teacher_channels, num_classes) -> loss`` for ``--loss name``."""

    def build(s_ch: list[int], t_ch: list[int], nc: int):
        if name == "famkd":
            weights = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
            return FAMKDLoss(s_ch, t_ch, num_classes=nc, **weights)
        if name == "mgd":
            return MGDLoss(s_ch, t_ch, **({} if alpha is None else {"alpha": alpha}))
        return FGDLoss(s_ch, t_ch)  # the published RetinaNet values; scale them with calibrate_weights

    return build


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: Sequence[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="ultralytics dataset yaml")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt)")
    p.add_argument("--student", default="yolov8n.yaml", help="student model yaml or checkpoint")
    p.add_argument("--loss", choices=("famkd", "mgd", "fgd"), default="famkd")
    p.add_argument("--alpha", type=float, default=None, help="feature weight (default: the loss's)")
    p.add_argument("--beta", type=float, default=None, help="FAMKD logits weight (default: the loss's)")
    p.add_argument("--branch", choices=("one2many", "one2one"), default="one2many", help="end-to-end heads")
    p.add_argument("train_args", nargs="*", metavar="key=value", help="passed to YOLO.train")
    args = p.parse_args(argv)

    from ultralytics import YOLO

    from famkd_losses.integrations.ultralytics import distillation_trainer

    extra = {}
    for item in args.train_args:
        key, sep, text = item.partition("=")
        if not sep:
            p.error(f"expected key=value for YOLO.train, got {item!r}")
        extra[key] = _value(text)
    trainer = distillation_trainer(loss_factory(args.loss, args.alpha, args.beta), branch=args.branch)
    model = YOLO(args.student)
    model.train(data=args.data, trainer=trainer, distill_model=args.teacher, **extra)
    return model


if __name__ == "__main__":
    main()
