"""``nn.Module`` losses: FAMKD (features + logits) and the related losses users compare against."""

from .cwd import CWDLoss
from .famkd import FAMKDLoss
from .feature import ScaleAwareMaskedFeatureLoss
from .fgd import FGDLoss
from .kd import KDLoss
from .logits import MaskedLogitsLoss
from .mgd import MGDLoss
from .pkd import PKDLoss

__all__ = [
    "CWDLoss",
    "FAMKDLoss",
    "FGDLoss",
    "KDLoss",
    "MGDLoss",
    "MaskedLogitsLoss",
    "PKDLoss",
    "ScaleAwareMaskedFeatureLoss",
]
