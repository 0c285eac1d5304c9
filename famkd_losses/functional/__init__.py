"""The reference maths in plain PyTorch: small pure functions that the losses are built from.

This layer is the ground truth for every fused kernel and the path used on CPU. Autograd
does the backward. Shapes: features (N, C, H, W); dense logits (N, A*K, H, W) or flattened
(N, P, K); guidance and weight maps (N, P) or (N, H, W).

Dtypes: float16/bfloat16 inputs are computed and reduced in float32; float32 stays float32
and float64 stays float64 (so ``torch.autograd.gradcheck`` runs on every function). Where a
docstring says float32, read "float32, or float64 for float64 inputs".
"""

from .attention import (
    attention_from_saliency,
    channel_attention,
    channel_saliency,
    saliencies,
    spatial_attention,
    spatial_saliency,
    teacher_attention,
)
from .guidance import (
    WEIGHT_MODES,
    feature_guidance,
    guidance_weights,
    mask_weights,
    region_aware_guidance,
    soft_weights,
)
from .kl import binary_kl, softmax_kl
from .logits import HEADS, position_kl, position_prob_diff, to_positions, weighted_kl_sum
from .masks import (
    MASK_MODES,
    bernoulli_mask,
    box_masks,
    channel_mask,
    mask_from_saliency,
    num_masked,
    select_mask,
    selection_keys,
    spatial_mask,
    topk_mask,
)
from .normalization import channel_wise_divergence, pearson_loss, standardize_channels
from .pyramid import active_scales, blockwise_upsample, max_pool, maxpool_pyramid, teacher_pyramid
from .reconstruction import (
    branch_reconstruction_error,
    fuse_reconstructions,
    fusion_weights,
    reconstruction_error,
    squared_error_sum,
)

__all__ = [
    "HEADS",
    "MASK_MODES",
    "WEIGHT_MODES",
    "active_scales",
    "attention_from_saliency",
    "bernoulli_mask",
    "binary_kl",
    "blockwise_upsample",
    "branch_reconstruction_error",
    "box_masks",
    "channel_attention",
    "channel_mask",
    "channel_saliency",
    "channel_wise_divergence",
    "feature_guidance",
    "fuse_reconstructions",
    "fusion_weights",
    "guidance_weights",
    "mask_from_saliency",
    "mask_weights",
    "max_pool",
    "maxpool_pyramid",
    "num_masked",
    "pearson_loss",
    "position_kl",
    "position_prob_diff",
    "reconstruction_error",
    "region_aware_guidance",
    "select_mask",
    "saliencies",
    "selection_keys",
    "soft_weights",
    "softmax_kl",
    "spatial_attention",
    "spatial_mask",
    "spatial_saliency",
    "squared_error_sum",
    "standardize_channels",
    "teacher_attention",
    "teacher_pyramid",
    "to_positions",
    "topk_mask",
    "weighted_kl_sum",
]
