"""One function per operation the losses need, each choosing between its fused Triton kernel
and its reference in `famkd_losses.functional` (backend, device, dtype, the sizes a kernel
takes) with the same signature and result as the reference; ``backend="auto"`` checks each
kernel against the reference on first use (see `famkd_losses.ops._dispatch`).

The losses call only these: a new kernel is a file in `famkd_losses.kernels` plus one
function here.
"""

from ._dispatch import TOLERANCES, VERIFY_ENV, reset_verification, verification_enabled, verified
from .logits import position_kl_and_prob_diff
from .masks import masked_inputs, topk_mask
from .pyramid import maxpool_pyramid, teacher_pyramid
from .reconstruction import reconstruction_error

__all__ = [
    "TOLERANCES",
    "VERIFY_ENV",
    "maxpool_pyramid",
    "masked_inputs",
    "position_kl_and_prob_diff",
    "reconstruction_error",
    "reset_verification",
    "teacher_pyramid",
    "topk_mask",
    "verification_enabled",
    "verified",
]
