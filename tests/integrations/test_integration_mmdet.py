"""famkd_losses.integrations.mmdet: the losses in MMEngine's MODELS registry, as mmdet/mmrazor configs use them.

Two parts. The first needs mmengine only: registration, building, config round-trips, and mmrazor's way
of calling a loss (``ConfigurableDistiller`` 1.0.0: recorders, ``_check_loss_forward_mappings``,
``compute_distill_losses``) transcribed in `_distill` and run on a tiny RetinaNet-shaped model with the
example config's distiller. The second (``test_real_*``) runs the real mmdet 3.3.0 and mmrazor 1.0.0 on
tiny RetinaNets built from mmdet's config files: a distillation step, mmrazor's ``tools/train.py`` for
two iterations, its checkpoint converter, and the example config; it skips, saying why, where mmcv,
mmdet or mmrazor cannot be imported.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

mmengine = pytest.importorskip(
    "mmengine", reason="mmengine is not installed (pip install famkd-losses[mmdet]); the mmdet integration is untested"
)

from mmengine import Config, ConfigDict  # noqa: E402
from mmengine.registry import MODELS, DefaultScope, Registry  # noqa: E402
from mmengine.structures import BaseDataElement, InstanceData  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402

import famkd_losses  # noqa: E402
from famkd_losses.integrations import mmdet as mm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mmrazor" / "famkd_retinanet_x101_r50.py"
NAMES = [  # every loss class of the package, in famkd_losses.losses.__all__'s order
    "CWDLoss",
    "FAMKDLoss",
    "FGDLoss",
    "KDLoss",
    "MGDLoss",
    "MaskedLogitsLoss",
    "PKDLoss",
    "ScaleAwareMaskedFeatureLoss",
]
K = 3  # classes of the small configs

# One small config per registered name; each loss's call uses the forward argument names, as
# mmrazor's loss_forward_mappings must.
SMALL_CFGS = {
    "FAMKDLoss": dict(type="FAMKDLoss", student_channels=[4, 4], teacher_channels=[8, 8], alpha=1e-3, num_classes=K),
    "ScaleAwareMaskedFeatureLoss": dict(type="ScaleAwareMaskedFeatureLoss", student_channels=4, teacher_channels=8),
    "MaskedLogitsLoss": dict(type="MaskedLogitsLoss", num_classes=K, beta=2.0),
    "MGDLoss": dict(type="MGDLoss", student_channels=4, teacher_channels=8, alpha=1e-3),
    "FGDLoss": dict(type="FGDLoss", student_channels=[4, 4], teacher_channels=[8, 8]),
    "PKDLoss": dict(type="PKDLoss", loss_weight=6.0),
    "CWDLoss": dict(type="CWDLoss", tau=1.0, loss_weight=10.0),
    "KDLoss": dict(type="KDLoss", mode="sigmoid", num_classes=K),
}


def _inputs(name: str, gen: torch.Generator) -> dict:
    """Keyword inputs for ``SMALL_CFGS[name]`` (student tensors require grad)."""

    def t(*shape, grad=False):
        return torch.randn(*shape, generator=gen).requires_grad_(grad)

    s2, t2 = [t(2, 4, 8, 8, grad=True), t(2, 4, 4, 4, grad=True)], [t(2, 8, 8, 8), t(2, 8, 4, 4)]
    logits_s, logits_t = (
        [t(2, 2 * K, 8, 8, grad=True), t(2, 2 * K, 4, 4, grad=True)],
        [t(2, 2 * K, 8, 8), t(2, 2 * K, 4, 4)],
    )
    if name == "FAMKDLoss":
        return dict(s_feats=tuple(s2), t_feats=tuple(t2), s_logits=logits_s, t_logits=logits_t)
    if name == "ScaleAwareMaskedFeatureLoss":
        return dict(s_feat=s2[0], t_feat=t2[0])
    if name in ("MaskedLogitsLoss", "KDLoss"):
        return dict(s_logits=logits_s, t_logits=logits_t)
    if name == "MGDLoss":
        return dict(s_feats=s2[0], t_feats=t2[0])
    if name == "FGDLoss":
        boxes = [torch.tensor([[4.0, 4.0, 40.0, 50.0]]), torch.zeros(0, 4)]
        return dict(s_feats=tuple(s2), t_feats=tuple(t2), boxes=boxes, image_size=(64, 64))
    # PKD, CWD: equal channels, no align layer
    return dict(s_feats=(t(2, 8, 8, 8, grad=True), t(2, 8, 4, 4, grad=True)), t_feats=tuple(t2))


def _check_runs(loss: nn.Module, kwargs: dict) -> torch.Tensor:
    value = loss(**kwargs)
    assert value.dim() == 0 and torch.isfinite(value), value
    value.backward()
    students = [v for v in kwargs.values() for v in (v if isinstance(v, (list, tuple)) else [v])]
    assert any(isinstance(v, torch.Tensor) and v.grad is not None and v.grad.abs().sum() > 0 for v in students)
    return value


@pytest.fixture
def child_registry():
    """A child of mmengine's MODELS, as ``mmrazor.registry.MODELS`` is; removed afterwards."""
    scope = f"famkd_test_{uuid.uuid4().hex[:8]}"
    child = Registry("model", parent=MODELS, scope=scope)
    yield child
    MODELS._children.pop(scope, None)


# ---- register() ------------------------------------------------------------------------------


def test_import_registered_all_names_in_mmengine_models():
    assert mm.REGISTERED_ON_IMPORT == NAMES
    for name in NAMES:
        assert MODELS.get(name) is mm.loss_classes()[name]
    assert MODELS.get("FAMKDLoss") is famkd_losses.FAMKDLoss
    assert issubclass(MODELS.get("FGDLoss"), famkd_losses.FGDLoss)


def test_register_all_names_in_a_fresh_registry_and_is_idempotent():
    reg = Registry("model")
    assert mm.register(reg) == NAMES == list(mm.LOSS_NAMES)
    assert sorted(reg.module_dict) == sorted(NAMES)
    assert mm.register(reg) == NAMES  # again: fine, nothing changes
    assert mm.register(reg, force=True) == NAMES
    assert mm.register() == NAMES  # the default registry, already filled at import
    for name in NAMES:
        assert reg.get(name) is mm.loss_classes()[name]


def test_register_refuses_a_clash_atomically_unless_forced():
    reg = Registry("model")

    class Other(nn.Module):
        pass

    reg.register_module(name="MGDLoss", module=Other)
    with pytest.raises(KeyError, match=r"MGDLoss .*force=True"):
        mm.register(reg)
    assert list(reg.module_dict) == ["MGDLoss"]  # nothing half-registered
    assert mm.register(reg, force=True) == NAMES
    assert reg.get("MGDLoss") is famkd_losses.MGDLoss


def test_register_rejects_a_non_registry():
    with pytest.raises(TypeError, match="mmengine Registry"):
        mm.register({})


def test_missing_mmengine_import_succeeds_and_register_names_the_extra(monkeypatch):
    """A fresh copy of the module with mmengine unimportable: the import works, register() says what to install."""
    for mod in [m for m in sys.modules if m == "mmengine" or m.startswith("mmengine.")]:
        monkeypatch.setitem(sys.modules, mod, None)
    name = "famkd_losses.integrations._mmdet_without_mmengine"
    spec = importlib.util.spec_from_file_location(name, mm.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert module.REGISTERED_ON_IMPORT == []
    with pytest.raises(ImportError, match=r"pip install famkd-losses\[mmdet\]"):
        module.register()


# ---- building from configs -------------------------------------------------------------------


def test_build_famkd_from_models_and_train_it():
    loss = MODELS.build(dict(type="FAMKDLoss", student_channels=[4, 4], teacher_channels=[8, 8], alpha=1e-3))
    assert isinstance(loss, famkd_losses.FAMKDLoss) and loss.num_levels == 2
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True), torch.randn(2, 4, 4, 4, generator=gen)]
    s[1].requires_grad_(True)
    t = [torch.randn(2, 8, 8, 8, generator=gen), torch.randn(2, 8, 4, 4, generator=gen)]
    value = loss(s, t)
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(p.grad is not None for p in loss.parameters())  # align convs, generators, fusion weights


@pytest.mark.parametrize("name", NAMES)
def test_every_type_builds_and_runs_with_keyword_inputs(name):
    loss = MODELS.build(dict(SMALL_CFGS[name]))
    assert isinstance(loss, getattr(famkd_losses, name))
    _check_runs(loss, _inputs(name, torch.Generator().manual_seed(1)))


def test_single_level_losses_take_single_tensors_as_mmrazor_passes_one_connector_output():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True), torch.randn(2, 8, 8, 8, generator=gen)
    zs, zt = torch.randn(2, 9 * K, 8, 8, generator=gen, requires_grad=True), torch.randn(2, 9 * K, 8, 8, generator=gen)
    famkd = MODELS.build(dict(type="FAMKDLoss", student_channels=4, teacher_channels=8, num_classes=K))
    _check_runs(famkd, dict(s_feats=s, t_feats=t, s_logits=zs, t_logits=zt))
    for cfg in (dict(type="MGDLoss"), dict(type="ScaleAwareMaskedFeatureLoss")):
        loss = MODELS.build(dict(cfg, student_channels=4, teacher_channels=8))
        assert torch.isfinite(loss(s, t))
    fgd = MODELS.build(dict(type="FGDLoss", student_channels=4, teacher_channels=8))
    assert torch.isfinite(fgd(s, t, boxes=[torch.tensor([[0.0, 0.0, 30.0, 30.0]])] * 2, image_size=(64, 64)))


class _Boxes:
    """Stands in for mmdet's HorizontalBoxes: the tensor is ``.tensor``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __len__(self) -> int:
        return len(self.tensor)


def _data_samples(boxes: list[torch.Tensor], size=(64, 64), wrap=False) -> list[BaseDataElement]:
    out = []
    for b in boxes:
        ds = BaseDataElement(metainfo=dict(batch_input_shape=size, img_shape=(60, 50)))
        ds.gt_instances = InstanceData(bboxes=_Boxes(b) if wrap else b)
        out.append(ds)
    return out


@pytest.mark.parametrize("wrap", [False, True])
def test_fgd_reads_boxes_and_input_size_from_det_data_samples(wrap):
    fgd = MODELS.build(dict(type="FGDLoss", student_channels=[4, 4], teacher_channels=[8, 8]))
    kwargs = _inputs("FGDLoss", torch.Generator().manual_seed(3))
    expected = fgd(**kwargs)
    samples = _data_samples(kwargs["boxes"], wrap=wrap)
    got = fgd(kwargs["s_feats"], kwargs["t_feats"], data_samples=samples)
    torch.testing.assert_close(got, expected)
    boxes, size = mm.boxes_from_data_samples(samples)
    assert size == (64, 64) and all(torch.equal(a, b) for a, b in zip(boxes, kwargs["boxes"]))
    with pytest.raises(ValueError, match="data_samples="):
        fgd(kwargs["s_feats"], kwargs["t_feats"])
    with pytest.raises(ValueError, match="batch_input_shape"):
        mm.boxes_from_data_samples([BaseDataElement(gt_instances=InstanceData(bboxes=torch.zeros(0, 4)))])
    with pytest.raises(ValueError, match="disagree"):
        mm.boxes_from_data_samples(_data_samples([torch.zeros(0, 4)]) + _data_samples([torch.zeros(0, 4)], (32, 64)))


def test_config_round_trip(tmp_path):
    """A Python config with a distill_losses dict: fromfile, build all, dump, load again: identical."""
    src = tmp_path / "distill.py"
    body = ",\n".join(f"    loss_{n.lower()}={cfg!r}" for n, cfg in SMALL_CFGS.items())
    src.write_text(
        'custom_imports = dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False)\n'
        f"distill_losses = dict(\n{body},\n)\n"
    )
    cfg = Config.fromfile(str(src))
    built = {k: MODELS.build(v) for k, v in cfg.distill_losses.items()}
    assert {type(v).__name__ for v in built.values()} >= {"FAMKDLoss", "MMDetFGDLoss", "KDLoss"}
    assert len(built) == len(NAMES)
    dumped = tmp_path / "dumped.py"
    cfg.dump(str(dumped))
    again = Config.fromfile(str(dumped))
    assert again.to_dict() == cfg.to_dict()
    rebuilt = {k: MODELS.build(v) for k, v in again.distill_losses.items()}
    for k, loss in built.items():
        assert type(rebuilt[k]) is type(loss)
        a, b = loss.state_dict(), rebuilt[k].state_dict()
        assert a.keys() == b.keys() and all(a[n].shape == b[n].shape for n in a)


def test_child_registry_builds_every_type(child_registry):
    for name in NAMES:
        loss = child_registry.build(dict(SMALL_CFGS[name]))
        assert isinstance(loss, getattr(famkd_losses, name))
    with DefaultScope.overwrite_default_scope(child_registry.scope):  # as under mmrazor's runner
        assert isinstance(MODELS.build(dict(SMALL_CFGS["FAMKDLoss"])), famkd_losses.FAMKDLoss)


def test_child_registry_clash_resolved_by_the_mmengine_scope_prefix(child_registry):
    """mmrazor's registry has its own MGDLoss/PKDLoss: 'mmengine.MGDLoss' names ours."""

    @child_registry.register_module(name="MGDLoss")
    class TheirMGD(nn.Module):
        def __init__(self, **kwargs) -> None:
            super().__init__()

    cfg = dict(type="MGDLoss", student_channels=4, teacher_channels=8)
    with DefaultScope.overwrite_default_scope(child_registry.scope):
        assert isinstance(child_registry.build(dict(cfg)), TheirMGD)
        ours = child_registry.build(dict(cfg, type="mmengine.MGDLoss"))
    assert type(ours) is famkd_losses.MGDLoss


_RECIPES = {
    # the custom_imports recipe, run as mmengine runs it
    "import_modules_from_strings": (
        "from mmengine.utils import import_modules_from_strings\n"
        'import_modules_from_strings(**dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False))'
    ),
    # Config.fromfile performs the example config's custom_imports
    "Config.fromfile": f"from mmengine import Config\nConfig.fromfile({str(EXAMPLE)!r})",
}


@pytest.mark.parametrize("recipe", list(_RECIPES))
def test_custom_imports_recipe_registers_in_a_fresh_interpreter(recipe):
    code = "\n".join(
        [
            "import sys",
            "from mmengine.registry import MODELS",
            f"names = {NAMES!r}",
            'assert not any(n in MODELS.module_dict for n in names), "registered before the import"',
            'assert "famkd_losses.integrations.mmdet" not in sys.modules',
            _RECIPES[recipe],
            "assert all(n in MODELS.module_dict for n in names), sorted(MODELS.module_dict)",
            'loss = MODELS.build(dict(type="FAMKDLoss", student_channels=4, teacher_channels=4))',
            'print("OK", type(loss).__name__)',
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK FAMKDLoss" in out.stdout


def test_custom_imports_recipe_in_this_process_is_a_no_op():
    (module,) = import_modules_from_strings(["famkd_losses.integrations.mmdet"])
    assert module is mm and MODELS.get("FAMKDLoss") is famkd_losses.FAMKDLoss


# ---- mmrazor's ConfigurableDistiller, transcribed (mmrazor 1.0.0) --------------------------------


def _check_mappings(losses: dict, mappings: dict, s_recorders: dict, t_recorders: dict) -> None:
    """``ConfigurableDistiller._check_loss_forward_mappings``."""
    for loss_name, forward_mappings in mappings.items():
        assert loss_name in losses
        params = inspect.signature(losses[loss_name].forward).parameters
        for key, info in forward_mappings.items():
            assert key in params, f"{key} is not in the signature of {type(losses[loss_name]).__name__}.forward"
            if params[key].default is not params[key].empty:
                continue
            assert "recorder" in info and isinstance(info["from_student"], bool)
            assert info["recorder"] in (s_recorders if info["from_student"] else t_recorders)


class _Recorders:
    """``ModuleOutputs`` / ``ModuleInputs`` recorders: forward hooks appending to a buffer per call."""

    def __init__(self, cfgs: dict, model: nn.Module) -> None:
        self.buffers: dict[str, list] = {name: [] for name in cfgs}
        for name, cfg in cfgs.items():
            assert cfg["type"] in ("ModuleOutputs", "ModuleInputs"), cfg
            module = model.get_submodule(cfg["source"])
            outputs = cfg["type"] == "ModuleOutputs"
            module.register_forward_hook(
                lambda m, inp, out, buf=self.buffers[name], o=outputs: buf.append(out if o else inp)
            )

    def get(self, recorder: str, record_idx: int = 0, data_idx: int | None = None):
        record = self.buffers[recorder][record_idx]
        return record if data_idx is None else record[data_idx]


def _distill(distiller_cfg: dict, student: nn.Module, teacher: nn.Module, x: torch.Tensor, registry=MODELS):
    """Build the distiller's losses and compute them as mmrazor does: ``loss(**recorded)``."""
    losses = {name: registry.build(cfg) for name, cfg in distiller_cfg["distill_losses"].items()}
    mappings = distiller_cfg["loss_forward_mappings"]
    _check_mappings(losses, mappings, distiller_cfg["student_recorders"], distiller_cfg["teacher_recorders"])
    s_rec = _Recorders(distiller_cfg["student_recorders"], student)
    t_rec = _Recorders(distiller_cfg["teacher_recorders"], teacher)
    with torch.no_grad():
        teacher(x)
    det = student(x)
    out = {}
    for name, forward_mappings in mappings.items():
        kwargs = {}
        for key, info in forward_mappings.items():
            info = dict(info)
            rec = s_rec if info.pop("from_student") else t_rec
            kwargs[key] = rec.get(**info)
        out[name] = losses[name](**kwargs)
    return det, out, losses


class _TinyRetinaNet(nn.Module):
    """RetinaNet's layout: ``neck`` returns a tuple of 5 levels; ``bbox_head`` returns
    ``(cls_scores, bbox_preds)`` lists, calling ``retina_cls`` once per level."""

    def __init__(self, channels: int, anchors: int, classes: int) -> None:
        super().__init__()
        self.neck = _Neck(channels)
        self.bbox_head = _Head(channels, anchors, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_scores, bbox_preds = self.bbox_head(self.neck(x))
        return sum(c.sigmoid().mean() + b.abs().mean() for c, b in zip(cls_scores, bbox_preds))


class _Neck(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fpn_convs = nn.ModuleList(nn.Conv2d(3, channels, 3, stride=2 ** (i + 3), padding=1) for i in range(5))

    def forward(self, x):
        return tuple(conv(x) for conv in self.fpn_convs)  # strides 8..128


class _Head(nn.Module):
    def __init__(self, channels: int, anchors: int, classes: int) -> None:
        super().__init__()
        self.retina_cls = nn.Conv2d(channels, anchors * classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(channels, anchors * 4, 3, padding=1)

    def forward(self, feats):
        outs = [(self.retina_cls(f), self.retina_reg(f)) for f in feats]
        return tuple(map(list, zip(*outs)))


@pytest.fixture(scope="module")
def example_cfg() -> Config:
    return Config.fromfile(str(EXAMPLE))  # no mmdet / mmrazor needed


def test_example_config_loads_and_has_the_published_schedule(example_cfg):
    cfg = example_cfg
    assert cfg.custom_imports == dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False)
    assert cfg.model.type == "SingleTeacherDistill" and cfg.model._scope_ == "mmrazor"
    assert "retinanet_x101-64x4d" in cfg.model.teacher.cfg_path and "retinanet_r50" in cfg.model.architecture.cfg_path
    assert cfg.model.distiller.type == "ConfigurableDistiller"
    assert cfg.train_cfg.max_epochs == 24
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, opt.lr, opt.momentum, opt.weight_decay) == ("SGD", 0.01, 0.9, 1e-4)
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.param_scheduler[1].milestones == [16, 22]
    for side in ("student_recorders", "teacher_recorders"):
        recs = cfg.model.distiller[side]
        assert {r.source for r in recs.values()} == {"neck", "bbox_head"}


def test_example_config_distill_losses_build_with_our_registry(example_cfg, child_registry):
    distiller = example_cfg.model.distiller
    for registry in (MODELS, child_registry):  # mmrazor builds from its child registry
        for name, cfg in distiller.distill_losses.items():
            assert "loss" in name  # mmengine only backpropagates keys containing "loss"
            loss = registry.build(cfg)
            assert isinstance(loss, famkd_losses.FAMKDLoss)
            assert loss.num_levels == 5 and loss.logits_loss.num_classes == 80
    _check_mappings(
        {n: MODELS.build(c) for n, c in distiller.distill_losses.items()},
        distiller.loss_forward_mappings,
        distiller.student_recorders,
        distiller.teacher_recorders,
    )


def test_example_config_distiller_runs_on_a_retinanet_shaped_model(example_cfg):
    """The example's distiller, as mmrazor would run it, on 256-channel, 5-level, 9x80-logit maps."""
    torch.manual_seed(0)
    student, teacher = _TinyRetinaNet(256, 9, 80), _TinyRetinaNet(256, 9, 80)
    teacher.requires_grad_(False)
    x = torch.randn(2, 3, 64, 64)  # P3-P7: 8, 4, 2, 1, 1
    det, out, losses = _distill(example_cfg.model.distiller.to_dict(), student, teacher, x)
    assert list(out) == ["loss_famkd"]
    value = out["loss_famkd"]
    assert torch.isfinite(value) and value > 0
    terms = losses["loss_famkd"].last_terms(as_float=True)
    assert {f"logits/level{i}" for i in range(5)} <= set(terms) and terms["feature"] > 0
    assert math.isclose(terms["total"], terms["feature"] + terms["logits"], rel_tol=1e-5)
    (det + value).backward()
    assert student.neck.fpn_convs[0].weight.grad.abs().sum() > 0
    assert student.bbox_head.retina_cls.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in losses["loss_famkd"].parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_per_level_layout_with_record_idx_and_fgd_with_data_samples():
    """One single-level loss per FPN level (``retina_cls`` recorded once per level, ``record_idx``),
    and FGD fed the detector's data samples (``ModuleInputs``, ``data_idx=1``)."""
    torch.manual_seed(0)
    c, a = 8, 2

    class Det(_TinyRetinaNet):
        def forward(self, x, data_samples=None):
            return super().forward(x)

    student, teacher = Det(c, a, K), Det(c, a, K)
    teacher.requires_grad_(False)
    rec = dict(
        fpn=dict(type="ModuleOutputs", source="neck"), cls=dict(type="ModuleOutputs", source="bbox_head.retina_cls")
    )
    losses, mappings = {}, {}
    for level in range(5):
        losses[f"loss_famkd_fpn{level}"] = dict(type="FAMKDLoss", student_channels=c, teacher_channels=c, num_classes=K)
        mappings[f"loss_famkd_fpn{level}"] = dict(
            s_feats=dict(from_student=True, recorder="fpn", data_idx=level),
            t_feats=dict(from_student=False, recorder="fpn", data_idx=level),
            s_logits=dict(from_student=True, recorder="cls", record_idx=level),
            t_logits=dict(from_student=False, recorder="cls", record_idx=level),
        )
    losses["loss_fgd"] = dict(type="FGDLoss", student_channels=[c] * 5, teacher_channels=[c] * 5)
    mappings["loss_fgd"] = dict(
        s_feats=dict(from_student=True, recorder="fpn"),
        t_feats=dict(from_student=False, recorder="fpn"),
        data_samples=dict(from_student=True, recorder="inputs", data_idx=1),
    )
    cfg = dict(
        student_recorders=dict(rec, inputs=dict(type="ModuleInputs", source="")),
        teacher_recorders=rec,
        distill_losses=losses,
        loss_forward_mappings=mappings,
    )
    x = torch.randn(2, 3, 64, 64)
    samples = _data_samples([torch.tensor([[8.0, 8.0, 40.0, 56.0]]), torch.zeros(0, 4)], wrap=True)

    class WithSamples(nn.Module):  # the detector is called as model(inputs, data_samples)
        def __init__(self, det):
            super().__init__()
            self.det = det

        def forward(self, x):
            return self.det(x, samples)

    # recorder sources are relative to the detector: hook on the inner one
    for side in ("student_recorders", "teacher_recorders"):
        cfg[side] = {k: dict(v, source=("det." + v["source"]).rstrip(".")) for k, v in cfg[side].items()}
    det, out, _ = _distill(cfg, WithSamples(student), WithSamples(teacher), x)
    assert len(out) == 6 and all(torch.isfinite(v) and v > 0 for v in out.values())
    (det + sum(out.values())).backward()
    assert student.neck.fpn_convs[4].weight.grad.abs().sum() > 0


# ---- the real packages: mmdet 3.3.0 and mmrazor 1.0.0 ------------------------------------------
# Tiny RetinaNets built from mmdet's own retinanet_r18_fpn_1x_coco.py (random weights, no downloads):
# the teacher's FPN and head are 64 channels wide, the student's 32, so every loss has real align convs.

OPENMMLAB_SKIP = (
    "mmdet 3.3.0 / mmrazor 1.0.0 are not importable ({}); they need mmcv 2.1.0 built with its ops (the package "
    "index has only its sdist) and mmrazor patched for torch 2.14 (examples/mmrazor/mmrazor-1.0.0-torch214.patch): "
    "see docs/guides/mmdetection.md"
)
STUDENT_CH, TEACHER_CH = 32, 64
RETINA_CFG = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"


@pytest.fixture(scope="module")
def openmmlab():
    """mmdet's and mmrazor's ``MODELS`` registries, or a skip saying what is missing."""
    for name in ("pkg_resources", "mmcv.ops", "mmdet.models", "mmrazor.models"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            pytest.skip(OPENMMLAB_SKIP.format(f"import {name}: {err}"))
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmrazor.registry import MODELS as RAZOR_MODELS

    return MMDET_MODELS, RAZOR_MODELS


def _retinanet_cfg(channels: int):
    """mmdet's RetinaNet-R18 config (a ``ConfigDict``): K classes, FPN and head ``channels`` wide, no pretrained
    backbone."""
    from mmengine.hub import get_config

    model = get_config(RETINA_CFG).model
    model.backbone.update(init_cfg=None, norm_eval=False)  # BN statistics move in train mode
    model.neck.out_channels = channels
    model.bbox_head.update(num_classes=K, in_channels=channels, feat_channels=channels, stacked_convs=1)
    return model


def _from(student: bool, recorder: str, data_idx: int | None = None) -> dict:
    """One ``loss_forward_mappings`` entry."""
    entry = dict(from_student=student, recorder=recorder)
    return entry if data_idx is None else dict(entry, data_idx=data_idx)


def _distill_model_cfg() -> dict:
    """SingleTeacherDistill + ConfigurableDistiller with FAMKD (features, class logits), our MGD, FGD (data_samples)."""
    recorders = dict(fpn=dict(type="ModuleOutputs", source="neck"), cls=dict(type="ModuleOutputs", source="bbox_head"))
    channels = dict(student_channels=[STUDENT_CH] * 5, teacher_channels=[TEACHER_CH] * 5)
    feats = dict(s_feats=_from(True, "fpn"), t_feats=_from(False, "fpn"))
    return dict(
        _scope_="mmrazor",
        type="SingleTeacherDistill",
        architecture=dict(_retinanet_cfg(STUDENT_CH), _scope_="mmdet"),
        teacher=dict(_retinanet_cfg(TEACHER_CH), _scope_="mmdet"),
        distiller=dict(
            type="ConfigurableDistiller",
            # the whole detector's inputs are (batch_inputs, data_samples)
            student_recorders=dict(recorders, inputs=dict(type="ModuleInputs", source="")),
            teacher_recorders=recorders,
            distill_losses=dict(
                loss_famkd=dict(type="FAMKDLoss", **channels, alpha=2e-5, num_classes=K),
                loss_mgd=dict(type="mmengine.MGDLoss", **channels, alpha=2e-5),  # mmrazor has an MGDLoss too
                loss_fgd=dict(type="FGDLoss", **channels),
            ),
            loss_forward_mappings=dict(
                loss_famkd=dict(
                    feats, s_logits=_from(True, "cls", data_idx=0), t_logits=_from(False, "cls", data_idx=0)
                ),
                loss_mgd=feats,
                loss_fgd=dict(feats, data_samples=_from(True, "inputs", data_idx=1)),
            ),
        ),
    )


def _det_batch(seed: int = 0) -> dict:
    """Two images of different sizes with boxes, as mmdet's PackDetInputs gives them (uint8 BGR, CHW)."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.bbox import HorizontalBoxes

    g = torch.Generator().manual_seed(seed)
    items = [
        ((96, 128), [[4.0, 6.0, 40.0, 50.0], [50.0, 20.0, 120.0, 90.0]], [0, 2]),
        ((128, 80), [[10.0, 12.0, 70.0, 100.0]], [1]),
    ]
    inputs, samples = [], []
    for (h, w), boxes, labels in items:
        inputs.append(torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=HorizontalBoxes(torch.tensor(boxes)), labels=torch.tensor(labels))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(after: dict, before: dict, keys=None) -> list[str]:
    return [k for k in (before if keys is None else keys) if not torch.equal(after[k], before[k])]


def test_real_registries_clash_only_on_mgd_and_pkd(openmmlab):
    mmdet_models, razor_models = openmmlab
    mmdet_models.import_from_location()
    razor_models.import_from_location()
    assert sorted(set(NAMES) & set(razor_models.module_dict)) == ["MGDLoss", "PKDLoss"]
    assert not set(NAMES) & set(mmdet_models.module_dict)
    for name in NAMES:  # what a config under _scope_="mmrazor" / "mmdet" gets
        ours = mm.loss_classes()[name]
        assert (razor_models.get(name) is ours) == (name not in ("MGDLoss", "PKDLoss"))
        assert razor_models.get(f"mmengine.{name}") is ours and mmdet_models.get(name) is ours


def test_real_single_teacher_distill_step(openmmlab):
    _, razor_models = openmmlab
    torch.manual_seed(0)
    algo = razor_models.build(_distill_model_cfg())
    student, teacher, losses = algo.student, algo.teacher, algo.distiller.distill_losses
    assert type(student).__name__ == type(teacher).__name__ == "RetinaNet"
    assert type(losses["loss_famkd"]) is famkd_losses.FAMKDLoss
    assert type(losses["loss_mgd"]) is famkd_losses.MGDLoss  # ours, not mmrazor's
    assert type(losses["loss_fgd"]) is mm.MMDetFGDLoss
    aligns = [m.align for m in [*losses["loss_famkd"].feature_losses, *losses["loss_mgd"].levels]]
    aligns += [m.align for m in losses["loss_fgd"].levels]
    assert len(aligns) == 15 and all(isinstance(a, nn.Conv2d) and a.in_channels == STUDENT_CH for a in aligns)
    trainable = [n for n, p in algo.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("teacher.") for n in trainable)
    # mmdet's config freezes the stem and the first stage (frozen_stages=1): everything else trains
    assert not any(n.startswith(("architecture.backbone.conv1.", "architecture.backbone.layer1.")) for n in trainable)
    assert any(n.startswith("architecture.backbone.layer2.") for n in trainable)
    assert any(n.startswith("distiller.distill_losses.loss_fgd.") for n in trainable)
    optimizer = torch.optim.SGD([p for p in algo.parameters() if p.requires_grad], lr=0.01)

    algo.train()  # SingleTeacherDistill puts the teacher's BN layers back in eval mode
    teacher_before, student_before = _state(teacher), _state(student)
    data = algo.data_preprocessor(_det_batch(), True)
    assert mm.boxes_from_data_samples(data["data_samples"])[1] == (128, 128)  # both padded to a multiple of 32
    loss_dict = algo(**data, mode="loss")
    total, log_vars = algo.parse_losses(loss_dict)
    log_vars = {k: float(v.detach()) for k, v in log_vars.items()}
    distill = ["distill.loss_famkd", "distill.loss_mgd", "distill.loss_fgd"]
    assert set(distill) | {"student.loss_cls", "student.loss_bbox"} <= set(log_vars)
    assert all(math.isfinite(log_vars[k]) and log_vars[k] > 0 for k in distill), log_vars
    assert torch.isfinite(total)
    famkd_terms = losses["loss_famkd"].last_terms(as_float=True)
    assert famkd_terms["feature"] > 0 and famkd_terms["logits"] > 0
    fgd_terms = losses["loss_fgd"].last_terms(as_float=True)
    assert fgd_terms["level0/fg"] > 0 and fgd_terms["level0/bg"] > 0  # the data samples' boxes mark part of P3

    # the distillation losses alone reach the student's FPN and class branch, not its box branch
    head = student.bbox_head
    probe = [student.neck.fpn_convs[0].conv.weight, head.retina_cls.weight, head.retina_reg.weight]
    grads = torch.autograd.grad(sum(loss_dict[k] for k in distill), probe, retain_graph=True, allow_unused=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0 and grads[2] is None

    optimizer.zero_grad()
    total.backward()
    assert not [n for n, p in algo.named_parameters() if p.requires_grad and p.grad is None]
    assert all(p.grad is None for p in teacher.parameters())
    # zero exactly where the official FGD initialisation makes it so: each context branch's last conv starts
    # at zero, so the attention conv and the layers before it get no gradient on the first step
    zero = {n for n, p in algo.named_parameters() if p.requires_grad and not p.grad.abs().sum()}
    context = re.compile(r"distiller\.distill_losses\.loss_fgd\.levels\.\d\.(conv_mask_.|channel_add_conv_.\.[01])\.")
    assert zero == {n for n in trainable if context.match(n)} and len(zero) == 5 * 2 * 6, sorted(zero)
    optimizer.step()
    bn_stats = [k for k in teacher_before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_stats) > 20
    assert not _changed(_state(teacher), teacher_before)  # weights and BN statistics
    assert _changed(_state(student), student_before)
    # the same comparison sees the student's BN statistics move (norm_eval=False): the teacher's would show
    assert _changed(_state(student), student_before, [k for k in student_before if k.endswith("running_mean")])

    # a second step: now the context branches get gradients too, except where they cannot: the attention
    # conv's bias (a softmax over positions ignores a constant) and, on P7's 1 x 1 map, its weight
    optimizer.zero_grad()
    algo.parse_losses(algo(**data, mode="loss"))[0].backward()
    params = dict(algo.named_parameters())
    exempt = {n for n in zero if (n.endswith(".bias") and "conv_mask_" in n) or ".levels.4.conv_mask_" in n}
    assert len(exempt) == 12
    assert all(params[n].grad.abs().sum() > 0 for n in zero - exempt)
    assert all(p.grad is None for p in teacher.parameters())


def _tiny_coco(root: Path) -> None:
    """Two random images with boxes, in COCO's format (classes a, b, c)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    (root / "images").mkdir(parents=True)
    items = [((96, 128), [[4, 6, 36, 44], [50, 20, 70, 70]], [1, 3]), ((128, 80), [[10, 12, 60, 88]], [2])]
    images, annotations = [], []
    for i, ((h, w), boxes, cats) in enumerate(items):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", height=h, width=w))
        for box, cat in zip(boxes, cats):
            annotations.append(
                dict(id=len(annotations), image_id=i, category_id=cat, bbox=box, area=box[2] * box[3], iscrowd=0)
            )
    categories = [dict(id=i + 1, name=name) for i, name in enumerate("abc")]
    (root / "annotations.json").write_text(
        json.dumps(dict(images=images, annotations=annotations, categories=categories))
    )


RUNNER_CFG = """\
custom_imports = dict(imports=["famkd_losses.integrations.mmdet"], allow_failed_imports=False)
default_scope = "mmdet"
model = {model!r}
train_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=False),
    dataset=dict(
        type="CocoDataset",
        data_root={data_root!r},
        ann_file="annotations.json",
        data_prefix=dict(img="images/"),
        metainfo=dict(classes=("a", "b", "c")),
        pipeline=[
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", with_bbox=True),
            dict(type="Resize", scale=(128, 128), keep_ratio=True),
            dict(type="RandomFlip", prob=0.5),
            dict(type="PackDetInputs"),
        ],
    ),
)
train_cfg = dict(type="IterBasedTrainLoop", max_iters=2)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=1e-4))
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=1),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False),
)
log_processor = dict(by_epoch=False, window_size=1)
visualizer = dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")])
env_cfg = dict(mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="gloo"))
randomness = dict(seed=0)
"""


def _mmrazor_tool(*parts: str) -> str:
    import mmrazor

    return str(Path(mmrazor.__file__).parent.joinpath(".mim", "tools", *parts))


@pytest.fixture(scope="module")
def runner_run(openmmlab, tmp_path_factory) -> Path:
    """mmrazor's tools/train.py, in a fresh interpreter, on a config file: 2 iterations, one checkpoint."""
    root = tmp_path_factory.mktemp("mmrazor_runner")
    _tiny_coco(root / "data")
    cfg = root / "distill_tiny_retinanet.py"
    model = ConfigDict(_distill_model_cfg()).to_dict()
    cfg.write_text(RUNNER_CFG.format(model=model, data_root=str(root / "data")))
    out = subprocess.run(
        [sys.executable, _mmrazor_tool("train.py"), str(cfg), "--work-dir", str(root / "work")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return root / "work"


def test_real_runner_trains_two_iterations_from_a_config_file(runner_run):
    """The config's custom_imports is what registers the losses: train.py never imports famkd_losses."""
    assert (runner_run / "iter_2.pth").is_file() and (runner_run / "last_checkpoint").is_file()
    (scalars,) = runner_run.glob("*/vis_data/scalars.json")
    logged = [json.loads(line) for line in scalars.read_text().splitlines()]
    assert [r["iter"] for r in logged] == [1, 2]
    for record in logged:
        for key in ("distill.loss_famkd", "distill.loss_mgd", "distill.loss_fgd", "student.loss_cls", "loss"):
            assert math.isfinite(record[key]) and record[key] > 0, (key, record)
    ckpt = torch.load(runner_run / "iter_2.pth", map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert ckpt["meta"]["iter"] == 2
    # the loss modules' parameters are trained and saved with the student; the teacher is saved too
    for prefix in (
        "architecture.",
        "teacher.",
        "distiller.distill_losses.loss_famkd.",
        "distiller.distill_losses.loss_fgd.",
    ):
        assert any(k.startswith(prefix) for k in state), prefix
    assert state["distiller.distill_losses.loss_mgd.levels.0.align.weight"].shape == (TEACHER_CH, STUDENT_CH, 1, 1)


def test_real_checkpoint_converts_to_a_plain_mmdet_student(openmmlab, runner_run, tmp_path):
    mmdet_models, _ = openmmlab
    # the converter's torch.load predates weights_only=True (torch >= 2.6), which rejects mmengine's HistoryBuffer
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    tool = _mmrazor_tool("model_converters", "convert_kd_ckpt_to_student.py")
    out = subprocess.run(
        [sys.executable, tool, str(runner_run / "iter_2.pth"), "--out-path", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    converted = tmp_path / "iter_2_student.pth"
    full = torch.load(runner_run / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]

    from mmengine.runner import load_checkpoint

    torch.manual_seed(1)
    student = mmdet_models.build(dict(_retinanet_cfg(STUDENT_CH), _scope_="mmdet"))
    assert type(student).__name__ == "RetinaNet"
    load_checkpoint(student, str(converted), map_location="cpu", strict=True)
    state = student.state_dict()
    assert set(state) == {k.removeprefix("architecture.") for k in full if k.startswith("architecture.")}
    assert all(torch.equal(v, full["architecture." + k]) for k, v in state.items())

    student.eval()
    student.bbox_head.test_cfg.score_thr = 0.0  # an untrained focal-loss head scores about its 0.01 prior
    batch = _det_batch()
    with torch.no_grad():
        (pred,) = student.test_step(dict(inputs=batch["inputs"][:1], data_samples=batch["data_samples"][:1]))
    boxes = pred.pred_instances.bboxes
    assert 0 < len(boxes) <= 100 and boxes.shape[1] == 4 and torch.isfinite(pred.pred_instances.scores).all()


def test_real_example_config_builds_and_trains_one_step(openmmlab, example_cfg):
    """examples/mmrazor/: X101-64x4d teacher, R50 student from mmdet's configs, one step at 128 x 128."""
    from mmengine.optim import build_optim_wrapper

    _, razor_models = openmmlab
    cfg = copy.deepcopy(example_cfg.model)  # the module's fixture stays as read
    cfg.teacher_ckpt = None  # the COCO checkpoint is a download: random weights here
    torch.manual_seed(0)
    algo = razor_models.build(cfg)
    assert type(algo).__name__ == "SingleTeacherDistill"
    assert algo.teacher.backbone.groups == 64 and algo.student.backbone.depth == 50
    optim_wrapper = build_optim_wrapper(algo, example_cfg.optim_wrapper)
    algo.train()
    teacher_before = _state(algo.teacher)
    head_before = algo.student.bbox_head.retina_cls.weight.detach().clone()
    log_vars = algo.train_step(_det_batch(), optim_wrapper)
    assert {"distill.loss_famkd", "student.loss_cls", "student.loss_bbox"} <= set(log_vars)
    assert all(math.isfinite(float(v)) for v in log_vars.values()) and float(log_vars["distill.loss_famkd"]) > 0
    terms = algo.distiller.distill_losses["loss_famkd"].last_terms(as_float=True)
    assert terms["feature"] > 0 and terms["logits"] > 0
    assert not torch.equal(algo.student.bbox_head.retina_cls.weight, head_before)
    assert not _changed(_state(algo.teacher), teacher_before)


def test_a_loss_that_declares_boxes_is_registered_taking_data_samples():
    from famkd_losses import FGDLoss, MGDLoss

    class BoxLoss(MGDLoss):  # a feature loss that also needs the boxes
        inputs = ("features", "boxes")

        def forward(self, s_feats, t_feats, boxes, image_size):
            return super().forward(s_feats, t_feats) + 0.0 * sum(b.sum() for b in boxes) + 0.0 * image_size[0]

    assert mm.for_mmdet(MGDLoss) is MGDLoss  # features only: registered as it is
    assert mm.for_mmdet(FGDLoss) is mm.MMDetFGDLoss
    wrapped = mm.for_mmdet(BoxLoss)
    assert issubclass(wrapped, BoxLoss) and issubclass(wrapped, mm.BoxesFromDataSamples)
    loss = wrapped(4, 4, seed=0)
    s, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sample = BaseDataElement(metainfo={"batch_input_shape": (32, 32)})
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[2.0, 2.0, 20.0, 20.0]]))
    assert torch.isfinite(loss(s, t, data_samples=[sample]))
    with pytest.raises(ValueError, match="BoxLoss needs the ground-truth boxes"):
        loss(s, t)
