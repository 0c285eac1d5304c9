"""famkd-losses: fine-grained adaptive feature masking distillation losses for object detection.

Drop-in ``nn.Module`` losses over plain tensors (FPN features ``(N, C, H, W)`` per level and
class logits), with the related losses (MGD, FGD, PKD, CWD, KD) beside them. The reference
maths lives in `famkd_losses.functional`.
"""

from . import functional
from ._backend import BACKENDS
from .calibration import calibrate_weights
from .losses import (
    CWDLoss,
    FAMKDLoss,
    FGDLoss,
    KDLoss,
    MaskedLogitsLoss,
    MGDLoss,
    PKDLoss,
    ScaleAwareMaskedFeatureLoss,
)
from .losses.presets import FULL_METHOD

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "CWDLoss",
    "FAMKDLoss",
    "FGDLoss",
    "FULL_METHOD",
    "KDLoss",
    "MGDLoss",
    "MaskedLogitsLoss",
    "PKDLoss",
    "ScaleAwareMaskedFeatureLoss",
    "__version__",
    "calibrate_weights",
    "functional",
]
