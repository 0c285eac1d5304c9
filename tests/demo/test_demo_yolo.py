"""The YOLO protocol of the demo: the YOLO-format export, the models, the losses and their weights, the
tables, the command line, and a ``--quick`` run end to end (slow).

Every test runs with the network blocked (sockets raise and the attempts are recorded) and
ultralytics in offline mode with its settings in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

os.environ["YOLO_OFFLINE"] = "1"
if "ultralytics" not in sys.modules:  # it reads the folder once, on import: keep the one it has
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="famkd-ultralytics-")  # never the user's folder

import inspect
import json
import math

import numpy as np
import pytest
import torch

# found, not imported: ultralytics is first imported by a test, under the settings folder set above
if importlib.util.find_spec("ultralytics") is None:
    pytest.skip("ultralytics not installed: pip install famkd-losses[ultralytics]", allow_module_level=True)
for _mod in ("torchvision", "mlxtend", "pycocotools", "matplotlib", "tqdm", "yaml"):
    pytest.importorskip(_mod, reason="the demo extra is not installed")

from _offline_ultralytics import local_font, no_network  # noqa: F401, E402

from famkd_losses import CWDLoss, FAMKDLoss  # noqa: E402
from famkd_losses.demo.data import SPLITS, DataConfig, make_dataset  # noqa: E402
from famkd_losses.demo.yolo import YoloConfig  # noqa: E402
from famkd_losses.demo.yolo_data import image_paths, label_lines, write_yolo_dataset, yolo_dataset_dir  # noqa: E402
from famkd_losses.demo.yolo_losses import AlignedCWDLoss, calibrated_loss, probe_batch  # noqa: E402
from famkd_losses.demo.yolo_models import YOLO_STUDENT, YOLO_TEACHER, YoloModelSpec, write_model_yaml  # noqa: E402
from famkd_losses.demo.yolo_report import aggregate, paired  # noqa: E402

SMALL = DataConfig(num_canvases=(12, 4, 6))


@pytest.fixture(scope="module")
def small_data():
    return make_dataset(SMALL)


def _model(spec: YoloModelSpec, folder, seed: int = 0):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(str(write_model_yaml(spec, folder)), nc=spec.nc, verbose=False)
    model.args = get_cfg(overrides={"imgsz": 128})
    return model


# ---------------------------------------------------------------- the YOLO-format export


def test_labels_give_back_the_pixel_boxes(small_data):
    split = small_data["train"]
    side = SMALL.canvas
    for i in range(len(split)):
        rows = [[float(v) for v in line.split()] for line in label_lines(split, i)]
        assert [int(r[0]) for r in rows] == split.labels[i].tolist()
        got = torch.tensor([[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] for _, cx, cy, w, h in rows]) * side
        torch.testing.assert_close(got, split.boxes[i], rtol=0, atol=1e-3)


def test_export_is_written_once_and_holds_the_canvases(small_data, tmp_path):
    import yaml
    from PIL import Image

    data_yaml = write_yolo_dataset(small_data, SMALL, tmp_path)
    root = yolo_dataset_dir(SMALL, tmp_path)
    assert data_yaml == root / "data.yaml"
    spec = yaml.safe_load(data_yaml.read_text())
    assert spec["path"] == str(root.resolve()) and os.path.isabs(spec["path"])
    assert spec["names"] == {k: str(k) for k in range(10)}
    for name in SPLITS:
        split = small_data[name]
        files = image_paths(root, name, len(split))
        assert sorted(p.name for p in (root / "images" / name).iterdir()) == [p.name for p in files]
        assert spec[name] == f"images/{name}"
        for i, path in enumerate(files):
            pixels = torch.from_numpy(np.array(Image.open(path)))
            assert torch.equal(pixels, split.images[i, 0])
            label = root / "labels" / name / f"{i:05d}.txt"
            assert label.read_text().splitlines() == label_lines(split, i)
    stamp = data_yaml.stat().st_mtime_ns
    assert write_yolo_dataset(small_data, SMALL, tmp_path) == data_yaml
    assert data_yaml.stat().st_mtime_ns == stamp, "a second call must reuse the export"
    assert yolo_dataset_dir(DataConfig(seed=1, num_canvases=(12, 4, 6)), tmp_path) != root


def test_ultralytics_reads_the_export_as_written(small_data, tmp_path):
    """ultralytics' own dataset loader finds every canvas, its 3-channel image and its labels."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(write_yolo_dataset(small_data, SMALL, tmp_path)))
    assert data["nc"] == 10
    args = get_cfg(overrides={"imgsz": SMALL.canvas, "fliplr": 0.0, "mosaic": 0.0})
    ds = build_yolo_dataset(args, data["test"], 2, data, mode="val")
    assert len(ds) == len(small_data["test"])
    for i in range(len(ds)):
        item = ds[i]
        assert item["img"].shape == (3, SMALL.canvas, SMALL.canvas)
        assert torch.equal(item["img"][0], small_data["test"].images[i, 0])
        assert item["cls"].reshape(-1).long().tolist() == small_data["test"].labels[i].tolist()


# ---------------------------------------------------------------- models and losses


def test_models_come_from_the_bundled_yaml_at_the_stated_multiples(tmp_path):
    teacher, student = _model(YOLO_TEACHER, tmp_path), _model(YOLO_STUDENT, tmp_path)
    assert teacher.yaml["width_multiple"] == 0.25 and student.yaml["width_multiple"] == 0.125
    assert "scales" not in teacher.yaml and teacher.yaml["nc"] == 10
    assert [float(s) for s in teacher.stride] == [float(s) for s in student.stride] == [8.0, 16.0, 32.0]
    from famkd_losses.integrations.ultralytics import yolo_outputs

    for model, channels in ((teacher, [64, 128, 256]), (student, [32, 64, 128])):
        model.eval()
        with torch.no_grad():
            out = yolo_outputs(model(torch.zeros(1, 3, 128, 128)))
        assert [f.shape[1] for f in out.features] == channels
        assert [f.shape[-1] for f in out.features] == [16, 8, 4]
    # same multiples, same file; the name never carries a scale letter ultralytics would read
    path = write_model_yaml(YOLO_STUDENT, tmp_path)
    assert path == write_model_yaml(YOLO_STUDENT, tmp_path) and path.name.startswith("yolov8-d0.33-w0.125-")


def test_aligned_cwd_is_cwd_of_the_projected_student():
    torch.manual_seed(0)
    loss = AlignedCWDLoss([4, 8], [6, 10], loss_weight=3.0)
    s = [torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(2, 8, 3, 3, requires_grad=True)]
    t = [torch.randn(2, 6, 5, 5), torch.randn(2, 10, 3, 3)]
    value = loss(s, t)
    expected = CWDLoss(loss_weight=3.0)([conv(x) for conv, x in zip(loss.align, s)], t)
    torch.testing.assert_close(value, expected)
    assert set(loss.last_terms()) == {"total", "level0", "level1"}
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.align.parameters())
    with pytest.raises(ValueError, match="same levels"):
        AlignedCWDLoss([4], [6, 10])


def test_probe_batch_is_ultralytics_batch_of_the_first_canvases(small_data):
    split = small_data["train"]
    batch = probe_batch(split, 3)
    assert batch["img"].shape == (3, 3, SMALL.canvas, SMALL.canvas)
    torch.testing.assert_close(batch["img"][:, 1], split.images[:3, 0].float() / 255)
    counts = [len(split.boxes[i]) for i in range(3)]
    assert batch["batch_idx"].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    lines = [line.split() for i in range(3) for line in label_lines(split, i)]
    torch.testing.assert_close(
        batch["bboxes"], torch.tensor([[float(v) for v in r[1:]] for r in lines]), atol=1e-6, rtol=0
    )
    assert batch["cls"].reshape(-1).tolist() == [float(r[0]) for r in lines]


@pytest.mark.parametrize("key", ["famkd", "cwd"])
def test_calibrated_terms_start_at_the_fraction_of_the_detection_loss(key, small_data, tmp_path):
    from famkd_losses.demo.yolo_losses import head_outputs
    from famkd_losses.integrations._outputs import distillation_loss

    teacher, student = _model(YOLO_TEACHER, tmp_path, 0), _model(YOLO_STUDENT, tmp_path, 1)
    batch = probe_batch(small_data["train"], 4)
    loss, record = calibrated_loss(key, student, teacher, batch, fraction=0.5, seed=0)
    s_out, t_out, det = head_outputs(student, teacher, batch)
    assert det == pytest.approx(record["det_loss"]) and det > 0
    with torch.no_grad():
        total = distillation_loss(loss, s_out, t_out)
    terms = loss.last_terms(as_float=True)
    if key == "famkd":
        assert isinstance(loss, FAMKDLoss)
        assert all(f.alpha == record["weights"]["feature"] for f in loss.feature_losses)
        assert loss.logits_loss.beta == record["weights"]["logits"]
        assert terms["feature"] == pytest.approx(0.5 * det, rel=1e-4)
        assert terms["logits"] == pytest.approx(0.5 * det, rel=1e-4)
    else:
        assert isinstance(loss, AlignedCWDLoss)
        assert float(total) == pytest.approx(0.5 * det, rel=1e-4)
    assert record["student_channels"] == [32, 64, 128] and record["teacher_channels"] == [64, 128, 256]


def test_default_weights_are_the_package_defaults(small_data, tmp_path):
    teacher, student = _model(YOLO_TEACHER, tmp_path, 0), _model(YOLO_STUDENT, tmp_path, 1)
    batch = probe_batch(small_data["train"], 2)
    loss, record = calibrated_loss("famkd", student, teacher, batch, kd_weights="defaults", seed=0)
    defaults = inspect.signature(FAMKDLoss).parameters
    assert record["weights"] == {"feature": defaults["alpha"].default, "logits": defaults["beta"].default}
    assert loss.logits_loss.beta == defaults["beta"].default
    with pytest.raises(ValueError, match="kd_weights must be one of"):
        calibrated_loss("famkd", student, teacher, batch, kd_weights="tuned")
    with pytest.raises(ValueError, match="kd_weights must be one of"):
        YoloConfig.preset(kd_weights="tuned")
    with pytest.raises(ValueError, match="student_epochs must be at least 1"):
        YoloConfig.preset(student_epochs=0)


def test_teacher_is_trained_once_per_configuration(tmp_path, monkeypatch):
    from famkd_losses.demo import yolo

    calls = []

    def fake_train(cfg, model_yaml, data_yaml, *, epochs, seed, project, name, **extra):
        calls.append((epochs, project))
        weights = tmp_path / f"{name}.pt"
        weights.write_bytes(b"weights")
        return {"weights": str(weights), "epochs": epochs, "train_s": 1.0, "median_epoch_s": 0.5}

    monkeypatch.setattr(yolo, "_train", fake_train)
    cfg = YoloConfig.preset(True, cache_dir=tmp_path / "cache")
    path, record = yolo._teacher(cfg, tmp_path / "t.yaml", tmp_path / "data.yaml", log=lambda _: None)
    assert not record["cached"] and path.read_bytes() == b"weights" and path.parent == tmp_path / "cache"
    again, record = yolo._teacher(cfg, tmp_path / "t.yaml", tmp_path / "data.yaml", log=lambda _: None)
    assert again == path and record["cached"] and len(calls) == 1
    assert calls[0][1] == tmp_path / "cache" / "yolo-runs"  # ultralytics' run folder: in the cache
    longer = YoloConfig.preset(True, cache_dir=tmp_path / "cache", teacher_epochs=3)
    other, _ = yolo._teacher(longer, tmp_path / "t.yaml", tmp_path / "data.yaml", log=lambda _: None)
    assert other != path and calls[-1][0] == 3


# ---------------------------------------------------------------- tables


def _run(key: str, seed: int, ap: float) -> dict:
    metrics = {m: ap for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    return {
        "key": key,
        "seed": seed,
        "epochs": 2,
        "train_s": 10.0,
        "median_epoch_s": 4.0,
        "median_epoch_cpu_s": 3.0,
        "test": metrics,
        "ultralytics_test": {"mAP50-95": ap + 1, "mAP50": ap + 2},
    }


def test_rows_are_mean_and_sample_std_and_differences_are_paired_by_seed():
    runs = [_run("student", 0, 10.0), _run("student", 1, 14.0), _run("famkd", 1, 15.0), _run("famkd", 0, 13.0)]
    runs.append(_run("builtin", 2, 50.0))
    rows = {r["key"]: r for r in aggregate(runs)}
    assert list(rows) == ["student", "builtin", "famkd"]
    assert rows["student"]["mean"]["AP"] == 12.0
    assert rows["student"]["std"]["AP"] == pytest.approx(math.sqrt(8.0))
    assert rows["famkd"]["mean"]["mAP50-95"] == 15.0 and rows["famkd"]["seeds"] == [1, 0]
    d = paired(runs, "famkd", "student")
    assert d["per_seed"] == [(1, 1.0), (0, 3.0)] and d["mean"] == 2.0
    assert paired(runs, "builtin", "student") is None  # no common seed


# ---------------------------------------------------------------- command line


def test_cli_refuses_what_the_yolo_protocol_does_not_do(tmp_path, capsys):
    from famkd_losses.demo.__main__ import main

    base = ["--detector", "yolo", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    assert main([*base, "--ablation"]) == 2
    assert main([*base, "--student-iters", "10"]) == 2
    assert main([*base, "--protocol", "plateau"]) == 2
    err = capsys.readouterr().err
    assert "counts epochs" in err and "plateau runs FCOS only" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_quick_yolo_end_to_end(tmp_path, monkeypatch):
    from famkd_losses.demo.__main__ import main

    monkeypatch.setenv("YOLO_VERBOSE", os.environ.get("YOLO_VERBOSE", "True"))  # restored afterwards
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--detector", "yolo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 0
    state = json.loads((out / "results.json").read_text())
    keys = [(r["key"], r["seed"]) for r in state["runs"]]
    assert keys == [
        ("student", 0),
        ("builtin", 0),
        ("famkd", 0),
        ("famkd_feature", 0),
        ("mgd", 0),
        ("cwd", 0),
        ("control", 0),
        ("student", 1),
        ("builtin", 1),
        ("famkd", 1),
    ]
    for run in [*state["runs"], state["teacher_run"]]:
        assert all(math.isfinite(v) for v in run["test"].values()), run["key"]
        assert all(math.isfinite(v) for v in run["ultralytics_test"].values()), run["key"]
    by_key = {r["key"]: r for r in state["runs"]}
    assert by_key["student"]["epochs"] == 1 and by_key["control"]["epochs"] >= 1
    assert state["control_match"]["run"] in ("builtin", "famkd", "famkd_feature", "mgd", "cwd")
    assert state["builtin_dis"] == 6.0  # ultralytics' default, untouched
    assert set(state["calibration"]) == {"famkd", "famkd_feature", "mgd", "cwd"}
    assert set(state["calibration"]["famkd_feature"]["weights"]) == {"feature"}  # no logits term
    assert [s for s, _ in state["paired"]["famkd - builtin"]["per_seed"]] == [0, 1]
    md = (out / "results.md").read_text()
    assert "smoke run" in md and "not evidence" in md
    for label in ("student alone", "ultralytics built-in", "FAMKD", "feature part", "MGD", "CWD", "wall time of the"):
        assert label in md
    assert (out / "ap_per_method.png").stat().st_size > 0
    assert list(cache.glob("yolo-teacher-*.pt")) and list(cache.glob("yolo-data-*/data.yaml"))
    assert list(work.iterdir()) == [], "ultralytics wrote into the working directory"
