"""Integrations call a loss with the inputs its class declares (features, logits, boxes)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import famkd_losses.losses as losses
from famkd_losses import FAMKDLoss, FGDLoss, KDLoss, MaskedLogitsLoss, MGDLoss
from famkd_losses.integrations._outputs import ARGUMENTS, DetectorOutputs, distillation_loss
from famkd_losses.losses._base import INPUT_KINDS, DistillationLoss

SIZES = [(8, 8), (4, 4)]


def _outputs(channels: int, seed: int) -> DetectorOutputs:
    g = torch.Generator().manual_seed(seed)
    return DetectorOutputs(
        features=[torch.randn(2, channels, h, w, generator=g) for h, w in SIZES],
        cls_logits=[torch.randn(2, 3, h, w, generator=g) for h, w in SIZES],
        image_size=(32, 32),
        boxes=[torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)],
    )


class _Seen(DistillationLoss):
    """A loss that keeps what it was given."""

    def forward(self, *args: object) -> Tensor:
        self.args = args
        self._record({"total": torch.zeros(())})
        return torch.zeros(())


class _LogitsOnly(_Seen):
    inputs = ("logits",)


class _FeaturesLogitsBoxes(_Seen):
    inputs = ("features", "logits", "boxes")
    optional_inputs = ("boxes",)


def test_every_loss_class_declares_what_its_forward_takes():
    assert tuple(ARGUMENTS) == INPUT_KINDS
    for name in losses.__all__:
        cls = getattr(losses, name)
        assert "inputs" in vars(cls), name
        assert set(cls.inputs) <= set(INPUT_KINDS) and set(cls.optional_inputs) <= set(cls.inputs), name
    assert FAMKDLoss.inputs == ("features", "logits") and FAMKDLoss.optional_inputs == ("logits",)
    assert MaskedLogitsLoss.inputs == KDLoss.inputs == ("logits",)
    assert FGDLoss.inputs == ("features", "boxes") and MGDLoss.inputs == ("features",)


def test_a_logits_only_loss_gets_the_logits():
    s, t = _outputs(4, 0), _outputs(4, 1)
    loss = _LogitsOnly()
    distillation_loss(loss, s, t)
    assert loss.args == (s.cls_logits, t.cls_logits)
    distillation_loss(loss, s, t, logits=False)  # the logits are all it takes: still given
    assert loss.args == (s.cls_logits, t.cls_logits)
    kd = KDLoss()
    torch.testing.assert_close(distillation_loss(kd, s, t), kd(s.cls_logits, t.cls_logits))


def test_inputs_come_in_the_declared_order():
    s, t = _outputs(4, 0), _outputs(4, 1)
    loss = _FeaturesLogitsBoxes()
    distillation_loss(loss, s, t)
    assert loss.args == (s.features, t.features, s.cls_logits, t.cls_logits, t.boxes, t.image_size)
    undeclared = _Seen()  # features unless a loss says otherwise
    distillation_loss(undeclared, s, t)
    assert undeclared.args == (s.features, t.features)


def test_famkd_goes_without_logits_on_request():
    s, t = _outputs(4, 0), _outputs(6, 1)
    kd = FAMKDLoss([4, 4], [6, 6], num_classes=3)
    distillation_loss(kd, s, t)
    assert "logits" in kd.last_terms()
    value = distillation_loss(kd, s, t, logits=False)
    assert "logits" not in kd.last_terms()
    torch.testing.assert_close(value, kd(s.features, t.features))


def test_a_module_that_declares_nothing_is_refused():
    with pytest.raises(TypeError, match="loss must be one of famkd_losses' loss modules"):
        distillation_loss(nn.Linear(2, 2), _outputs(4, 0), _outputs(4, 1))

    class Unknown(_Seen):
        inputs = ("masks",)

    with pytest.raises(ValueError, match=r"Unknown.inputs names \['masks'\]"):
        distillation_loss(Unknown(), _outputs(4, 0), _outputs(4, 1))
