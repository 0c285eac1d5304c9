"""ultralytics integration: tiny YOLO teacher and student built from model yamls, no downloads.

Every test runs with the network blocked (sockets raise and the attempts are recorded) and
ultralytics in offline mode with its settings in a temporary folder.
"""

from __future__ import annotations

import os
import tempfile

os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="famkd-ultralytics-")  # never the user's folder

import pytest
import torch

pytest.importorskip("ultralytics", reason="ultralytics not installed: pip install famkd-losses[ultralytics]")

from _offline_ultralytics import local_font, no_network  # noqa: F401
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from famkd_losses import FAMKDLoss, FGDLoss, MGDLoss
from famkd_losses.integrations.ultralytics import (
    FAMKDTrainer,
    YOLODistillationModel,
    distillation_trainer,
    yolo_outputs,
)

NC = 3
SIDE = 64


def _model(cfg: str, seed: int) -> DetectionModel:
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=NC, verbose=False)
    model.args = get_cfg()  # the hyper-parameters its detection loss reads (the trainer attaches them)
    return model


def _batch(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "img": torch.rand(n, 3, SIDE, SIDE, generator=g),
        "cls": torch.tensor([[0.0], [2.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.2, 0.1], [0.6, 0.7, 0.5, 0.3]]),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
    }


@pytest.fixture(scope="module")
def pair():
    return _model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1)


def test_yolo_outputs_match_the_head_modules(pair):
    """Features = the Detect head's inputs; logits = each level's cls conv output, unchanged."""
    _, student = pair
    head = student.model[-1]
    seen: dict = {}
    handles = [head.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", [t.clone() for t in args[0]]))]
    for i, conv in enumerate(head.cv3):
        handles.append(conv.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.clone())))
    student.train()
    batch = _batch()
    try:
        out = yolo_outputs(student(batch["img"]), image_size=(SIDE, SIDE), batch=batch)
    finally:
        for h in handles:
            h.remove()
    assert [tuple(f.shape) for f in out.features] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    for level, (f, z) in enumerate(zip(out.features, out.cls_logits)):
        torch.testing.assert_close(f, seen["x"][level], rtol=0, atol=0)
        assert z.shape == (2, NC, f.shape[-2], f.shape[-1])
        torch.testing.assert_close(z, seen[level], rtol=0, atol=0)
    assert out.image_size == (SIDE, SIDE)


def test_yolo_outputs_boxes_are_pixel_xyxy_per_image(pair):
    _, student = pair
    student.eval()
    with torch.no_grad():
        out = yolo_outputs(student(_batch()["img"]), image_size=(SIDE, SIDE), batch=_batch())  # eval: (y, dict)
    student.train()
    torch.testing.assert_close(out.boxes[0], torch.tensor([[19.2, 19.2, 44.8, 44.8], [9.6, 12.8, 22.4, 19.2]]))
    torch.testing.assert_close(out.boxes[1], torch.tensor([[22.4, 35.2, 54.4, 54.4]]))


def test_yolo_outputs_errors():
    obb = {"bboxes": torch.zeros(3, 5), "batch_idx": torch.zeros(3)}
    with pytest.raises(ValueError, match="axis-aligned"):
        yolo_outputs({"scores": torch.zeros(1, 3, 4), "feats": [torch.zeros(1, 4, 2, 2)]}, batch=obb)
    with pytest.raises(ValueError, match="branch must be one of"):
        yolo_outputs({}, branch="both")
    with pytest.raises(TypeError, match="raw output of a YOLO Detect head"):
        yolo_outputs(torch.zeros(2, 7, 84))
    with pytest.raises(TypeError, match="no 'feats' entry"):
        yolo_outputs({"scores": torch.zeros(1, 3, 5)})
    with pytest.raises(ValueError, match="cover 5 cells"):
        yolo_outputs({"scores": torch.zeros(1, 3, 5), "feats": [torch.zeros(1, 4, 2, 2)]})


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.dtype.is_floating_point}


def _changed(before: dict, module: torch.nn.Module) -> int:
    after = module.state_dict()
    return sum(not torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "factory",
    [
        None,
        lambda s, t, nc: MGDLoss(s, t, seed=0),
        lambda s, t, nc: FGDLoss(s, t, alpha=1e-3, beta=5e-4, gamma=5e-4, lam=5e-6),
    ],
    ids=["famkd", "mgd", "fgd"],
)
def test_one_training_step_trains_the_student_and_the_loss_not_the_teacher(factory):
    teacher, student = _model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1)
    model = YOLODistillationModel(teacher, student, factory)
    model.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    t0, s0, l0 = _params(teacher), _params(student), _params(model.distill_loss)
    loss, items = model(_batch())
    assert list(items) == ["box_loss", "cls_loss", "dfl_loss", "dis_loss"]
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert items["dis_loss"].shape == (1,) and float(items["dis_loss"]) > 0
    torch.testing.assert_close(loss[3], items["dis_loss"][0] * 2)  # times the batch, as ultralytics does
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    loss.sum().backward()
    opt.step()
    assert _changed(t0, teacher) == 0, "the teacher (weights or BN statistics) changed"
    assert _changed(s0, student) > 0
    assert _changed(l0, model.distill_loss) > 0, "the loss's align layers / generators did not train"


@pytest.mark.parametrize(
    "factory",
    [
        lambda s, t, nc: MGDLoss(s, t, seed=0),
        lambda s, t, nc: FAMKDLoss(s, t, num_classes=nc, mask_mode="sample", seed=0),
    ],
    ids=["mgd", "famkd_sample"],
)
def test_model_ema_takes_a_loss_with_a_seeded_mask_stream(factory):
    """ultralytics' ModelEMA over a model whose loss carries its mask stream in state_dict (0-d
    int64 step buffers): updates run, the floating entries are averaged and the steps are left
    exact; the half-precision checkpoint copy keeps them int64; the model's steps count the calls."""
    from copy import deepcopy

    from ultralytics.utils.torch_utils import ModelEMA

    teacher, student = _model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1)
    model = YOLODistillationModel(teacher, student, factory)
    model.train()
    ema = ModelEMA(model)
    steps = [k for k, v in model.state_dict().items() if k.endswith("mask_step")]
    assert steps and all(model.state_dict()[k].dtype == torch.int64 for k in steps)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = {k: v.detach().clone() for k, v in ema.ema.state_dict().items()}
    for _ in range(2):
        loss, _ = model(_batch())
        loss.sum().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    msd, esd = model.state_dict(), ema.ema.state_dict()
    assert all(int(msd[k]) == 2 for k in steps)
    assert all(esd[k].dtype == torch.int64 and esd[k].shape == () for k in steps)
    assert any(not torch.equal(esd[k], before[k]) for k in esd if esd[k].dtype.is_floating_point)
    saved = deepcopy(ema.ema).half().state_dict()  # what ultralytics' checkpoints hold
    assert all(saved[k].dtype == torch.int64 and torch.equal(saved[k], esd[k]) for k in steps)


@pytest.mark.parametrize("logits", [True, False])
def test_the_distillation_term_is_the_loss_on_the_heads_tensors(logits):
    """dis_loss equals FAMKDLoss called directly on what the two heads produced (logits=False: on the
    features alone, and no logits part is recorded)."""
    teacher, student = _model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1)
    factory = lambda s, t, nc: FAMKDLoss(s, t, num_classes=nc, alpha=1e-3)  # noqa: E731
    model = YOLODistillationModel(teacher, student, factory, logits=logits)
    model.train()
    batch = _batch()
    _, items = model(batch)
    with torch.no_grad():
        t = yolo_outputs(teacher(batch["img"]))
        s = yolo_outputs(student(batch["img"]))
        given = (s.cls_logits, t.cls_logits) if logits else ()
        expected = model.distill_loss(s.features, t.features, *given)
    torch.testing.assert_close(items["dis_loss"][0], expected)
    assert ("logits" in model.distill_loss.last_terms()) is logits and "feature" in model.distill_loss.last_terms()


def test_autocast_bf16_step_is_finite():
    model = YOLODistillationModel(_model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, items = model(_batch())
        # the heads' maps are bf16 under autocast
        assert yolo_outputs(model.student_model(_batch()["img"])).cls_logits[0].dtype == torch.bfloat16
    assert model.distill_loss.last_terms()["total"].dtype == torch.float32  # reduced in float32
    assert items["dis_loss"].dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    grads = [p.grad for p in model.distill_loss.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_end_to_end_heads_distil_either_branch():
    teacher, student = _model("yolo26s.yaml", 0), _model("yolo26n.yaml", 1)
    many = YOLODistillationModel(teacher, student)
    one = YOLODistillationModel(teacher, student, branch="one2one")
    head = student.model[-1]
    with torch.no_grad():  # the one2one head starts as a copy of one2many: shift its level-0 biases
        head.one2one_cv3[0][-1].bias += 1.0
    many.train()
    raw = student(_batch()["img"])
    a = yolo_outputs(raw, branch="one2many")
    b = yolo_outputs(raw, branch="one2one")
    torch.testing.assert_close(b.cls_logits[0] - a.cls_logits[0], torch.ones_like(a.cls_logits[0]))
    torch.testing.assert_close(b.cls_logits[1], a.cls_logits[1])
    for f_a, f_b in zip(a.features, b.features):
        assert f_a is f_b  # both branches read the same neck features
    batch = _batch()
    with torch.no_grad():
        t_raw = teacher(batch["img"])
    for m, branch in ((many, "one2many"), (one, "one2one")):
        m.train()
        loss, items = m(batch)
        assert torch.isfinite(loss).all() and float(items["dis_loss"]) > 0
        with torch.no_grad():  # the wrapper used its branch's logits
            s = yolo_outputs(student(batch["img"]), branch=branch)
            t = yolo_outputs(t_raw, branch=branch)
            expected = m.distill_loss(s.features, t.features, s.cls_logits, t.cls_logits)
        torch.testing.assert_close(items["dis_loss"][0], expected)


def test_wrapper_errors():
    teacher, student = _model("yolov8s.yaml", 0), _model("yolov8n.yaml", 1)
    with pytest.raises(ValueError, match="branch must be one of"):
        YOLODistillationModel(teacher, student, branch="o2o")
    with pytest.raises(TypeError, match=r"must return an nn\.Module"):
        YOLODistillationModel(teacher, student, lambda s, t, nc: "famkd")
    with pytest.raises(TypeError, match="teacher_model must be"):
        YOLODistillationModel(42, student)
    other = DetectionModel("yolov8s.yaml", nc=NC + 1, verbose=False)
    with pytest.raises(ValueError, match="same classes; student has nc=3, teacher nc=4"):
        YOLODistillationModel(other, student)
    p6 = DetectionModel("yolov8s-p6.yaml", nc=NC, verbose=False)
    with pytest.raises(ValueError, match="same strides"):
        YOLODistillationModel(p6, student)
    with pytest.raises(ValueError, match="branch must be one of"):
        distillation_trainer(branch="x")
    with pytest.raises(TypeError, match="loss must be a loss module or a factory"):
        distillation_trainer("famkd")


def _dataset(root) -> str:
    """4 train and 4 val 64x64 images of coloured rectangles, in ultralytics' YOLO format."""
    import numpy as np
    import yaml
    from PIL import Image

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for split, seed in (("train", 0), ("val", 1)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        rng = np.random.default_rng(seed)
        for i in range(4):
            img = np.full((SIDE, SIDE, 3), 40, np.uint8)
            lines = []
            for _ in range(2):
                c = int(rng.integers(NC))
                w, h = (int(v) for v in rng.integers(10, 30, 2))
                x, y = int(rng.integers(0, SIDE - w)), int(rng.integers(0, SIDE - h))
                img[y : y + h, x : x + w] = colours[c]
                lines.append(f"{c} {(x + w / 2) / SIDE} {(y + h / 2) / SIDE} {w / SIDE} {h / SIDE}")
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            (root / split / "labels" / f"{i}.txt").write_text("\n".join(lines))
    data = root / "data.yaml"
    names = {i: f"c{i}" for i in range(NC)}
    data.write_text(yaml.safe_dump({"path": str(root), "train": "train/images", "val": "val/images", "names": names}))
    return str(data)


def _train(tmp_path, trainer, **kw):
    from ultralytics import YOLO

    yolo = YOLO("yolov8n.yaml")
    yolo.train(
        data=_dataset(tmp_path / "data"),
        trainer=trainer,
        epochs=1,
        imgsz=SIDE,
        batch=2,
        workers=0,
        device="cpu",
        plots=False,
        amp=False,
        project=str(tmp_path / "runs"),
        name="famkd",
        exist_ok=True,
        verbose=False,
        **kw,
    )
    return yolo.trainer


def test_trainer_distils_from_a_checkpoint_and_saves_only_the_student(tmp_path):
    teacher = _model("yolov8s.yaml", 0)
    torch.save({"model": teacher}, tmp_path / "teacher.pt")
    trainer = _train(tmp_path, FAMKDTrainer, distill_model=str(tmp_path / "teacher.pt"))
    model = trainer.model
    assert isinstance(model, YOLODistillationModel) and isinstance(model.distill_loss, FAMKDLoss)
    assert trainer.loss_names == ("box_loss", "cls_loss", "dfl_loss", "dis_loss")
    assert all(torch.isfinite(v).all() for v in trainer.tloss.values()) and float(trainer.tloss["dis_loss"]) > 0
    # the optimizer trains the loss's own layers; the teacher stays frozen
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in model.distill_loss.parameters())
    assert not any(p.requires_grad for p in model.teacher_model.parameters())
    ckpt = torch.load(trainer.last, weights_only=False)
    assert type(ckpt["model"]) is DetectionModel, "the checkpoint must hold the student alone"


def test_bound_trainer_with_a_teacher_module_and_another_loss(tmp_path):
    trainer_cls = distillation_trainer(lambda s, t, nc: MGDLoss(s, t, seed=0), teacher=_model("yolov8s.yaml", 0))
    trainer = _train(tmp_path, trainer_cls)
    assert isinstance(trainer.model.distill_loss, MGDLoss)
    assert float(trainer.tloss["dis_loss"]) > 0


def test_bound_trainer_passes_logits_false_to_the_wrapper(tmp_path):
    trainer_cls = distillation_trainer(teacher=_model("yolov8s.yaml", 0), logits=False)
    trainer = _train(tmp_path, trainer_cls)
    assert trainer.model.logits is False and "logits" not in trainer.model.distill_loss.last_terms()
    assert float(trainer.tloss["dis_loss"]) > 0


def test_trainer_without_a_teacher_says_how_to_give_one(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher: pass distill_model="):
        _train(tmp_path, FAMKDTrainer)


def test_trainer_refuses_quantisation_aware_training(tmp_path):
    torch.save({"model": _model("yolov8s.yaml", 0)}, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="does not support quantize=8"):
        _train(tmp_path, FAMKDTrainer, distill_model=str(tmp_path / "teacher.pt"), quantize=8)


def test_bound_trainer_survives_cloudpickle_as_ultralytics_ddp_launch_needs(tmp_path):
    """Multi-GPU runs re-create the trainer class in fresh worker processes from a cloudpickle of it."""
    import subprocess
    import sys

    cloudpickle = pytest.importorskip("cloudpickle")
    teacher = _model("yolov8s.yaml", 0)
    trainer_cls = distillation_trainer(lambda s, t, nc: MGDLoss(s, t, alpha=3e-5), teacher=teacher, branch="one2one")
    (tmp_path / "trainer.pkl").write_bytes(cloudpickle.dumps(trainer_cls))
    code = (
        "import pickle, sys, torch\n"
        "cls = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "from famkd_losses.integrations.ultralytics import FAMKDTrainer\n"
        "loss = cls.loss_factory([16, 32], [32, 64], 3)\n"
        "print(issubclass(cls, FAMKDTrainer), cls.branch, type(loss).__name__, loss.alpha,\n"
        "      sum(p.numel() for p in cls.teacher.parameters()))\n"
    )
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "trainer.pkl")], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    n_teacher = sum(p.numel() for p in teacher.parameters())
    assert out.stdout.split() == ["True", "one2one", "MGDLoss", "3e-05", str(n_teacher)]


def test_missing_ultralytics_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "ultralytics", None)  # `import ultralytics...` now raises ImportError
    for name in [m for m in sys.modules if m.startswith("ultralytics.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "famkd_losses.integrations.ultralytics")
    with pytest.raises(ImportError, match=r"pip install 'famkd-losses\[ultralytics\]'"):
        importlib.import_module("famkd_losses.integrations.ultralytics")


def test_the_example_script_trains_with_fgd(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "ultralytics_distill.py"
    spec = importlib.util.spec_from_file_location("ultralytics_distill", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.save({"model": _model("yolov8s.yaml", 0)}, tmp_path / "teacher.pt")
    args = ["--data", _dataset(tmp_path / "data"), "--teacher", str(tmp_path / "teacher.pt"), "--loss", "fgd"]
    args += ["epochs=1", f"imgsz={SIDE}", "batch=2", "workers=0", "device=cpu", "plots=false", "amp=false"]
    args += [f"project={tmp_path / 'runs'}", "name=example", "verbose=false"]
    model = example.main(args)
    assert isinstance(model.trainer.model.distill_loss, FGDLoss)
    assert float(model.trainer.tloss["dis_loss"]) > 0


def test_resume_rebuilds_the_wrapper_with_the_trained_loss(tmp_path):
    """An interrupted FAMKDTrainer run resumes with its student, its loss module and a teacher."""
    import shutil

    from ultralytics import YOLO

    teacher_path = tmp_path / "teacher.pt"
    torch.save({"model": _model("yolov8s.yaml", 0)}, teacher_path)
    saved = tmp_path / "interrupted.pt"

    def keep_epoch_1(trainer):  # last.pt as written after epoch 1 of 2 (the end of a run strips it)
        if trainer.epoch == 0:
            shutil.copy(trainer.last, saved)

    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_model_save", keep_epoch_1)
    common = {"imgsz": SIDE, "batch": 2, "workers": 0, "device": "cpu", "plots": False, "amp": False}
    yolo.train(
        data=_dataset(tmp_path / "data"),
        trainer=FAMKDTrainer,
        distill_model=str(teacher_path),
        epochs=2,
        project=str(tmp_path / "runs"),
        name="first",
        verbose=False,
        **common,
    )
    ckpt = torch.load(saved, weights_only=False)
    assert isinstance(ckpt["ema"], YOLODistillationModel) and ckpt["ema"].teacher_model is None
    trained_loss = {k: v.float() for k, v in ckpt["ema"].projector.state_dict().items()}

    resumed = YOLO(str(saved))
    start: dict = {}
    resumed.add_callback(  # the loss module as the resumed run starts training
        "on_pretrain_routine_end",
        lambda tr: start.update({k: v.detach().clone() for k, v in tr.model.distill_loss.state_dict().items()}),
    )
    resumed.train(resume=True, trainer=FAMKDTrainer, distill_model=str(teacher_path), **common)
    trainer = resumed.trainer
    assert trainer.start_epoch == 1 and isinstance(trainer.model, YOLODistillationModel)
    assert trainer.model.teacher_model is not None
    assert float(trainer.tloss["dis_loss"]) > 0
    assert set(start) == set(trained_loss)
    for key, value in trained_loss.items():  # the resumed run starts from the checkpoint's loss weights
        torch.testing.assert_close(start[key], value, rtol=0, atol=0)
