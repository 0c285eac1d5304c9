"""calibrate_weights: exact arithmetic, measurement forms, and its errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from famkd_losses import MGDLoss
from famkd_losses.calibration import calibrate_weights, measured_value


def test_each_term_lands_on_its_fraction_exactly():
    # powers of two: every product and quotient below is exact in binary floating point
    w = calibrate_weights({"feature": 2.0, "logits": 0.25}, det_loss=4.0, fraction=0.5)
    assert w == {"feature": 1.0, "logits": 8.0}
    assert w["feature"] * 2.0 == 0.5 * 4.0
    assert w["logits"] * 0.25 == 0.5 * 4.0


def test_default_fraction_is_one():
    assert calibrate_weights({"a": 8.0}, 2.0) == {"a": 0.25}


def test_per_term_fractions_and_base_weights():
    w = calibrate_weights(
        {"feature": 512.0, "logits": 0.5},
        det_loss=2.0,
        fraction={"feature": 0.25, "logits": 2.0},
        base_weights={"feature": 2.0**-10},
    )
    # feature: 2^-10 * 2^-2 * 2^1 / 2^9 = 2^-20; logits: 1 * 2 * 2 / 0.5 = 8
    assert w == {"feature": 2.0**-20, "logits": 8.0}


def test_result_keeps_the_order_of_terms_and_is_float():
    w = calibrate_weights({"z": 1.0, "a": 2.0, "m": 4.0}, 1.0)
    assert list(w) == ["z", "a", "m"]
    assert all(type(v) is float for v in w.values())


def test_tensors_are_read_and_detached():
    term = torch.tensor(4.0, requires_grad=True) * 1.0
    det = torch.tensor([8.0], dtype=torch.float64)
    w = calibrate_weights({"t": term}, det, fraction=0.5)
    assert w == {"t": 1.0}
    assert term.requires_grad  # the caller's graph is untouched


def test_sequences_are_averaged():
    # mean term 3, mean detection loss 6: 0.5 * 6 / 3 = 1
    w = calibrate_weights({"t": [2.0, torch.tensor(4.0)]}, [5.0, 7.0], fraction=0.5)
    assert w == {"t": 1.0}
    assert measured_value("x", [1.0, 2.0, 4.0]) == 7.0 / 3.0


def test_rescaling_a_loss_puts_it_on_target():
    """End to end on a real loss: measured at alpha=1, rebuilt with the weight, same layers and mask
    (the state_dict from before the probe's call: it carries the mask stream's position)."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6)
    probe = MGDLoss(4, 8, alpha=1.0, seed=3)
    state = copy.deepcopy(probe.state_dict())
    value = probe(s, t)
    w = calibrate_weights({"mgd": value}, det_loss=3.0, fraction=0.5)
    loss = MGDLoss(4, 8, alpha=w["mgd"], seed=3)
    loss.load_state_dict(state)
    assert math.isclose(float(loss(s, t).detach()), 1.5, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("terms", "det", "kwargs", "match"),
    [
        ({"t": 0.0}, 1.0, {}, "not positive"),
        ({"t": -1.0}, 1.0, {}, "not positive"),
        ({"t": float("nan")}, 1.0, {}, "not finite"),
        ({"t": float("inf")}, 1.0, {}, "not finite"),
        ({"t": 1.0}, 0.0, {}, "det_loss must be positive"),
        ({"t": 1.0}, float("nan"), {}, "det_loss is not finite"),
        ({"t": 1.0}, 1.0, {"fraction": 0.0}, "fraction"),
        ({"t": 1.0}, 1.0, {"fraction": float("inf")}, "fraction"),
        ({"t": 1.0}, 1.0, {"fraction": {"u": 1.0}}, "unknown: \\['u'\\], missing: \\['t'\\]"),
        ({"t": 1.0}, 1.0, {"base_weights": {"u": 1.0}}, "not in terms"),
        ({"t": 1.0}, 1.0, {"base_weights": {"t": 0.0}}, "base weight"),
        ({}, 1.0, {}, "non-empty"),
        ({"t": torch.ones(2)}, 1.0, {}, "scalar"),
        ({"t": []}, 1.0, {}, "empty sequence"),
    ],
)
def test_bad_input_raises_with_a_message(terms, det, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate_weights(terms, det, **kwargs)


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="bool"):
        calibrate_weights({"t": True}, 1.0)
    with pytest.raises(TypeError, match="number"):
        calibrate_weights({"t": "1.0"}, 1.0)
