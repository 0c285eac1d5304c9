"""Losses over FPN levels: `LevelLosses` (one single-level loss per level), the `Levels` calls
and checks, the sum, the per-level parts of `last_terms`, and the state_dict layout that
checkpoints of the multi-level losses hold."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from famkd_losses import FULL_METHOD, FAMKDLoss, FGDLoss, MGDLoss, ScaleAwareMaskedFeatureLoss
from famkd_losses.losses._base import DistillationLoss, prefixed_terms
from famkd_losses.losses._levels import LevelLosses, Levels, level_terms, sum_terms

SIZES = [(8, 8), (4, 4), (2, 2)]
FGD_PARTS = ("fg", "bg", "attention", "global")


def _feats(c: int, seed: int, sizes=SIZES, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, w, generator=g, dtype=torch.float64) for h, w in sizes]


def _levels(**kw) -> LevelLosses:
    torch.manual_seed(0)
    return LevelLosses((ScaleAwareMaskedFeatureLoss(4, 6) for _ in SIZES), **kw).double()


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_sum_terms_starts_from_the_first_term():
    terms = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    with _OpCounter() as counter:
        total = sum_terms(terms)
    assert total.item() == 7.0 and counter.ops == ["add", "add"]  # no zero to add
    assert sum_terms(terms[:1]) is terms[0]
    with pytest.raises(ValueError, match="at least one term"):
        sum_terms([])


def test_container_is_the_sum_of_its_levels_with_their_parts():
    s, t = _feats(4, 0), _feats(6, 1)
    levels = _levels()
    total = levels(s, t)
    singles = [loss(x, y) for loss, x, y in zip(levels, s, t)]
    torch.testing.assert_close(total, singles[0] + singles[1] + singles[2], rtol=0, atol=0)
    terms = levels.last_terms()
    assert terms["total"].item() == total.item()
    for i, loss in enumerate(levels):
        assert terms[f"level{i}"].item() == singles[i].item()
        for key, value in loss.last_terms().items():
            if key != "total":
                assert terms[f"level{i}/{key}"].item() == value.item()
    assert "level2/scale4" not in terms and "level0/scale4" in terms  # 2x2: scale 4 skipped


def test_container_without_level_totals_keeps_only_the_levels_parts():
    levels = LevelLosses([FGDLoss(4, 6), FGDLoss(4, 6)], level_totals=False).double()
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)]
    levels(_feats(4, 0)[:2], _feats(6, 1)[:2], boxes, (32, 32))
    assert set(levels.last_terms()) == {"total"} | {f"level{i}/{p}" for i in (0, 1) for p in FGD_PARTS}


def test_container_passes_extra_outputs_per_level():
    s, t = _feats(4, 0), _feats(6, 1)
    levels = _levels()
    total, aligned = levels(s, t, return_aligned=True)
    assert total.item() == levels(s, t).item()
    assert len(aligned) == len(SIZES)
    for loss, x, a in zip(levels, s, aligned):
        assert not a.requires_grad
        torch.testing.assert_close(a, loss.align(x), rtol=0, atol=0)


def test_container_checks_levels_against_level_0():
    s, t = _feats(4, 0), _feats(6, 1)
    with pytest.raises(ValueError, match=r"s_feats has 2 levels but this loss was built for 3 \(student_channels"):
        _levels()(s[:2], t[:2])
    s_batch = [*s[:2], torch.randn(3, 4, 2, 2, dtype=torch.float64)]
    t_batch = [*t[:2], torch.randn(3, 6, 2, 2, dtype=torch.float64)]
    _levels()(s_batch, t_batch)  # batch sizes may differ unless asked
    with pytest.raises(ValueError, match="batch size at level 2 is 3 but level 0 has 2"):
        _levels(same_batch=True)(s_batch, t_batch)
    on_meta = Levels.split("s_feats", [*s[:2], s[2].to("meta")], "t_feats", [*t[:2], t[2].to("meta")])
    with pytest.raises(ValueError, match="s_feats at level 2 is on meta but s_feats at level 0 is on cpu"):
        on_meta.map(lambda s, t, *, level: None)


def test_a_level_of_the_container_names_its_level_in_errors():
    s, t = _feats(4, 0), _feats(6, 1)
    with pytest.raises(ValueError, match="student feature at level 1 has 5 channels"):
        _levels()([s[0], torch.randn(2, 5, 4, 4, dtype=torch.float64), s[2]], t)
    with pytest.raises(ValueError, match="student feature has 5 channels"):  # a loss called alone
        ScaleAwareMaskedFeatureLoss(4, 6)(torch.randn(2, 5, 4, 4), torch.randn(2, 6, 4, 4))


def test_levels_map_names_levels_only_where_asked():
    a, b = torch.zeros(2, 1), torch.ones(2, 1)
    seen = []
    Levels.split("s", a, "t", b).map(lambda s, t, *, level: seen.append(level))
    Levels.split("s", [a, a], "t", [b, b]).map(lambda s, t, *, level: seen.append(level))
    Levels.split("s", a, "t", b, built_for=1).map(lambda s, t, *, level: seen.append(level))
    assert seen == [None, 0, 1, 0]
    got = Levels.split("s", [a, a], "t", [b, b]).map(lambda s, t, x, *, level: x, ["p", "q"])
    assert got == ["p", "q"]


def test_prefixed_terms_keep_lazy_parts_lazy():
    class Lazy(DistillationLoss):
        def forward(self, x):
            self._record({"total": x, "part": lambda: x * 2})
            return x

    loss = Lazy()
    loss(torch.tensor(3.0))
    terms = prefixed_terms("lazy", loss)
    assert set(terms) == {"lazy", "lazy/part"} and callable(terms["lazy/part"])
    assert set(prefixed_terms("lazy", loss, with_total=False)) == {"lazy/part"}
    assert loss.last_terms()["part"].item() == 6.0
    assert level_terms(["a", "b"]) == {"level0": "a", "level1": "b"}


def test_famkd_logits_parts_stay_lazy_until_read():
    kd = FAMKDLoss([4] * 3, [6] * 3, **FULL_METHOD).double()
    zs, zt = _feats(6, 2), _feats(6, 3)
    kd(_feats(4, 0), _feats(6, 1), zs, zt)
    assert all(callable(kd._recorded()[f"logits/level{i}"]) for i in range(3))
    parts = kd.last_terms()
    torch.testing.assert_close(sum(parts[f"logits/level{i}"] for i in range(3)), parts["logits"])


# The state_dict keys of the multi-level losses as the checkpoints hold them.
FAMKD_KEYS = [
    f"feature_losses.{level}.{name}"
    for level in (0, 1)
    for name in (
        "fusion_logits",
        "mask_step",
        "align.weight",
        "align.bias",
        *(f"generators.{b}.0.{i}.{p}" for b in ("spatial", "channel") for i in (0, 2) for p in ("weight", "bias")),
    )
]
MGD_KEYS = [
    f"levels.{level}.{name}"
    for level in (0, 1)
    for name in (
        "mask_step",
        "align.weight",
        "align.bias",
        *(f"generation.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    )
]
FGD_KEYS = [
    f"levels.{level}.{name}"
    for level in (0, 1)
    for name in (
        "align.weight",
        "align.bias",
        *(f"conv_mask_{x}.{p}" for x in "st" for p in ("weight", "bias")),
        *(f"channel_add_conv_{x}.{i}.{p}" for x in "st" for i in (0, 1, 3) for p in ("weight", "bias")),
    )
]


@pytest.mark.parametrize(
    ("make", "keys"),
    [
        (lambda: FAMKDLoss([4, 4], [6, 6], **{**FULL_METHOD, "mask_mode": "sample"}, seed=0), FAMKD_KEYS),
        (lambda: MGDLoss([4, 4], [6, 6], seed=0), MGD_KEYS),
        (lambda: FGDLoss([4, 4], [6, 6]), FGD_KEYS),
    ],
    ids=["famkd", "mgd", "fgd"],
)
def test_checkpoints_of_the_multi_level_losses_keep_loading(make, keys):
    saved = make()
    assert list(saved.state_dict()) == keys
    feats = (_feats(4, 0)[:2], _feats(6, 1)[:2])
    args = (*feats, [torch.zeros(0, 4, dtype=torch.float64)] * 2, (16, 16)) if isinstance(saved, FGDLoss) else feats
    saved.double()(*args)  # advances the mask streams
    checkpoint = {k: v.clone() for k, v in saved.state_dict().items()}
    restored = make().double()
    restored.load_state_dict(checkpoint, strict=True)
    assert all(torch.equal(v, checkpoint[k]) for k, v in restored.state_dict().items())
    assert restored(*args).item() == saved(*args).item()  # the same masks and layers
