"""Thin adapters between detector codebases and the losses.

Each submodule imports its codebase lazily, so importing this package needs nothing beyond
torch; using a submodule without its codebase raises ``ImportError`` naming the extra to install.

- `famkd_losses.integrations.torchvision`: FPN features, dense class logits, input size and
  resized boxes from torchvision's FCOS and RetinaNet (``pip install famkd-losses[torchvision]``).
- `famkd_losses.integrations.mmdet`: registers every loss in MMEngine's ``MODELS`` registry, for
  mmdetection/mmrazor configs (``pip install famkd-losses[mmdet]``).
- `famkd_losses.integrations.ultralytics`: a trainer that distils a YOLO teacher inside
  ultralytics' own training loop (``pip install famkd-losses[ultralytics]``).
"""

__all__: list[str] = []
