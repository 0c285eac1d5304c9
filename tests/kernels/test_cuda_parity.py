"""On a GPU: every loss with backend="triton" against backend="torch" at the shapes of a real
detector (COCO at 1344x800, FPN P3-P7, 256 channels, RetinaNet's 720 logit channels), values
and gradients, in float32 and under bf16 autocast. The interpreter tests cover awkward shapes;
this covers the sizes that only a GPU can run in seconds. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from famkd_losses import FULL_METHOD, FAMKDLoss, FGDLoss, MaskedLogitsLoss, MGDLoss
from famkd_losses.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")

LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]
N, CS, CT, K, A = 2, 128, 256, 80, 9
# float32: both sides compute in float32, the kernels in another order of additions; bf16:
# autocast rounds the generators' outputs, which both backends then read alike.
TOL = {torch.float32: {"rtol": 2e-4, "atol": 1e-6}, torch.bfloat16: {"rtol": 2e-2, "atol": 1e-4}}


def _feats(seed: int, logits: bool):
    g = torch.Generator().manual_seed(seed)

    def mk(c, h, w, grad):
        return torch.randn(N, c, h, w, generator=g).cuda().requires_grad_(grad)

    s = [mk(CS, h, w, True) for h, w in LEVELS]
    t = [mk(CT, h, w, False) for h, w in LEVELS]
    zs = [mk(A * K, h, w, True) for h, w in LEVELS] if logits else []
    zt = [mk(A * K, h, w, False) for h, w in LEVELS] if logits else []
    return s, t, zs, zt


NAMES = ["famkd_full_method", "famkd_defaults", "logits", "logits_softmax", "mgd", "fgd"]


def _loss(name: str):
    """(a builder taking the backend, what the loss is called with): True = features and logits,
    "only" = logits, False = features, else the extra arguments (FGD's boxes and image size)."""
    ch_s, ch_t = [CS] * len(LEVELS), [CT] * len(LEVELS)
    if name == "famkd_full_method":
        return (lambda b: FAMKDLoss(ch_s, ch_t, num_classes=K, backend=b, **FULL_METHOD)), True
    if name == "famkd_defaults":
        return (lambda b: FAMKDLoss(ch_s, ch_t, num_classes=K, backend=b)), True
    if name == "logits":
        return (lambda b: MaskedLogitsLoss(num_classes=K, backend=b)), "only"
    if name == "logits_softmax":
        return (lambda b: MaskedLogitsLoss(num_classes=K, head="softmax", backend=b)), "only"
    if name == "mgd":
        return (lambda b: MGDLoss(ch_s, ch_t, seed=0, backend=b)), False
    h, w = LEVELS[0]
    boxes = [torch.tensor([[16.0, 24.0, 400.0, 300.0], [600.0, 100.0, 1000.0, 700.0]], device="cuda")] * N
    return (lambda b: FGDLoss(ch_s, ch_t, backend=b)), (boxes, (8 * h, 8 * w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_triton_matches_torch_at_coco_shapes(name, dtype):
    make, extra = _loss(name)
    ref_mod = make("torch").cuda()
    tri_mod = make("triton").cuda()
    tri_mod.load_state_dict(copy.deepcopy(ref_mod.state_dict()))
    s, t, zs, zt = _feats(0, logits=extra is True or extra == "only")

    def run(mod):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            if extra == "only":
                loss = mod(zs, zt)
            elif extra is True:
                loss = mod(s, t, zs, zt)
            elif extra is False:
                loss = mod(s, t)
            else:
                loss = mod(s, t, *extra)
        inputs = zs if extra == "only" else [*s, *zs]
        params = [p for p in mod.parameters() if p.requires_grad]
        grads = torch.autograd.grad(1.7 * loss, [*inputs, *params])
        return loss.detach(), grads

    ref, ref_grads = run(ref_mod)
    got, got_grads = run(tri_mod)
    assert torch.isfinite(got) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
