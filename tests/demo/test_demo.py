"""The detection demo: data generation, evaluation, calibration of the methods, teacher cache, and
a ``--quick`` run end to end (slow)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

for _mod in ("torchvision", "mlxtend", "pycocotools", "matplotlib", "tqdm"):
    pytest.importorskip(_mod, reason="the demo extra is not installed")

from famkd_losses.demo.data import SPLITS, DataConfig, batch_order, load_digits, make_dataset, split_digits  # noqa: E402
from famkd_losses.demo.evaluate import AREA_RANGES, METRICS, coco_ground_truth, coco_metrics  # noqa: E402
from famkd_losses.demo.methods import METHODS, build_distiller  # noqa: E402
from famkd_losses.demo.models import (  # noqa: E402
    STUDENT,
    TEACHER,
    DetectorConfig,
    build_detector,
    positives_per_level,
)
from famkd_losses.demo.train import TrainConfig, load_or_train_teacher, probe_batch  # noqa: E402

SMALL = DataConfig(num_canvases=(60, 20, 20))


@pytest.fixture(scope="module")
def small_data():
    return make_dataset(SMALL)


# ---------------------------------------------------------------- data


def test_generation_is_deterministic(small_data):
    again = make_dataset(SMALL)
    for name in SPLITS:
        a, b = small_data[name], again[name]
        assert torch.equal(a.images, b.images)
        assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
        assert all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))


def test_another_seed_gives_other_canvases(small_data):
    other = make_dataset(DataConfig(seed=1, num_canvases=(60, 20, 20)))
    assert not torch.equal(small_data["train"].images, other["train"].images)


def test_digit_pools_are_disjoint_and_stratified():
    _, labels = load_digits()
    pools = split_digits(labels, (350, 50, 100), seed=0)
    sets = {name: set(pools[name].tolist()) for name in SPLITS}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    for name, per_class in zip(SPLITS, (350, 50, 100)):
        counts = torch.bincount(torch.from_numpy(labels[pools[name]]), minlength=10)
        assert counts.tolist() == [per_class] * 10


def test_splits_draw_only_from_their_own_pool(small_data):
    pools = [set(small_data[n].digit_ids.tolist()) for n in SPLITS]
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])


def test_boxes_lie_inside_the_canvas_and_labels_are_digits(small_data):
    s = SMALL.canvas
    for split in small_data.values():
        assert split.images.shape[1:] == (1, s, s) and split.images.dtype == torch.uint8
        for boxes, labels in zip(split.boxes, split.labels):
            assert 1 <= len(boxes) <= SMALL.max_digits
            assert len(labels) == len(boxes)
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= s).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all()
            assert ((labels >= 0) & (labels <= 9)).all()


def test_box_is_the_ink_extent(small_data):
    split = small_data["train"]
    x1, y1, x2, y2 = split.boxes[0][0].long().tolist()
    patch = split.image(0)[0]
    # the digit's ink reaches each edge of its box (the canvas may hold brighter clutter elsewhere)
    assert patch[y1:y2, x1:x2].max() > 0.5
    assert (patch[y1:y2, x1] > SMALL.ink_threshold).any() and (patch[y1:y2, x2 - 1] > SMALL.ink_threshold).any()
    assert (patch[y1, x1:x2] > SMALL.ink_threshold).any() and (patch[y2 - 1, x1:x2] > SMALL.ink_threshold).any()


def test_objects_at_every_scale(small_data):
    for split in small_data.values():
        bands = torch.cat(split.bands)
        assert torch.bincount(bands, minlength=3).min() > 0, split.name
        boxes = torch.cat(split.boxes)
        longest = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        for band, (lo, hi) in enumerate(SMALL.scale_bands):
            sel = longest[bands == band]
            # the ink box of the resized digit is its longest side, give or take the resampling's edge pixel
            assert sel.min() >= lo - 2 and sel.max() <= hi + 1


def test_batch_order_is_seeded_full_and_a_prefix_of_longer_runs():
    a = batch_order(50, 8, 20, seed=3)
    assert a == batch_order(50, 8, 20, seed=3)
    assert a != batch_order(50, 8, 20, seed=4)
    assert all(len(b) == 8 for b in a)
    assert batch_order(50, 8, 40, seed=3)[:20] == a
    first_epoch = [i for b in a for i in b][:50]
    assert sorted(first_epoch) == list(range(50))


# ---------------------------------------------------------------- models


def test_every_fpn_level_gets_positives(small_data):
    """With the demo's ranges and cell-centred anchors, P3..P7 all see objects (with torchvision's ranges
    every object goes to P3)."""
    targets = [small_data["train"].target(i) for i in range(len(small_data["train"]))]
    for kind in ("fcos", "retinanet"):
        pos = positives_per_level(build_detector(DetectorConfig(kind=kind, backbone=STUDENT)), targets, SMALL.canvas)
        assert len(pos["positive_locations"]) == 5
        assert min(pos["positive_locations"]) > 0, (kind, pos)
        assert pos["objects_without_positive"] < 0.1 * pos["objects"], (kind, pos)


def test_anchors_are_centred_in_their_cells():
    from torchvision.models.detection.image_list import ImageList

    model = build_detector(DetectorConfig(backbone=STUDENT))
    feats = [torch.zeros(1, 1, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    anchors = model.anchor_generator(ImageList(torch.zeros(1, 1, 128, 128), [(128, 128)]), feats)[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres[0].tolist() == [4.0, 4.0]  # P3's first cell
    assert centres[-1].tolist() == [64.0, 64.0]  # P7's only cell: the canvas centre
    assert (anchors[:, 2] - anchors[:, 0])[-1] == 128.0


def test_student_is_narrower_than_teacher():
    t, s = build_detector(DetectorConfig(backbone=TEACHER)), build_detector(DetectorConfig(backbone=STUDENT))
    assert t.backbone.out_channels > s.backbone.out_channels
    assert sum(p.numel() for p in t.parameters()) > 5 * sum(p.numel() for p in s.parameters())


# ---------------------------------------------------------------- evaluation


def _gt(small_data):
    split = small_data["test"]
    return split, coco_ground_truth(split.boxes, split.labels, SMALL.canvas)


def _as_dets(boxes, labels):
    return [
        {"image_id": i, "category_id": int(lab) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0}
        for i, (b, ls) in enumerate(zip(boxes, labels))
        for (x1, y1, x2, y2), lab in zip(b.tolist(), ls.tolist())
    ]


def test_a_perfect_detector_scores_100(small_data):
    split, gt = _gt(small_data)
    m = coco_metrics(gt, _as_dets(split.boxes, split.labels))
    assert set(m) == set(METRICS)
    for name in METRICS:
        areas = {"APs": "small", "APm": "medium", "APl": "large"}
        if name in areas:
            lo, hi = AREA_RANGES[areas[name]]
            if not any(lo <= a["area"] < hi for a in gt["annotations"]):
                assert math.isnan(m[name])
                continue
        assert m[name] == pytest.approx(100.0), name


def test_an_empty_detector_scores_0(small_data):
    _, gt = _gt(small_data)
    assert coco_metrics(gt, []) == dict.fromkeys(METRICS, 0.0)


def test_wrong_classes_score_0_and_loose_boxes_lose_ap75(small_data):
    split, gt = _gt(small_data)
    wrong = [(lab + 1) % 10 for lab in split.labels]
    assert coco_metrics(gt, _as_dets(split.boxes, wrong))["AP"] == 0.0
    # grow each box by 30% of its size on every side: IoU about 0.39-0.6, never 0.75
    loose = []
    for b in split.boxes:
        wh = b[:, 2:] - b[:, :2]
        loose.append(torch.cat([b[:, :2] - 0.15 * wh, b[:, 2:] + 0.15 * wh], dim=1))
    m = coco_metrics(gt, _as_dets(loose, split.labels))
    assert m["AP75"] == 0.0 and 0.0 < m["AP"] < 100.0


def test_area_ranges_file_most_digits_in_their_band(small_data):
    boxes = torch.cat(small_data["train"].boxes)
    bands = torch.cat(small_data["train"].bands)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    filed = (area >= AREA_RANGES["medium"][0]).long() + (area >= AREA_RANGES["large"][0]).long()
    assert (filed == bands).float().mean() > 0.85


# ---------------------------------------------------------------- methods and training pieces


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    teacher = build_detector(DetectorConfig(backbone=TEACHER)).eval()
    student = build_detector(DetectorConfig(backbone=STUDENT))
    return teacher, student


@pytest.mark.parametrize("key", list(METHODS))
def test_each_method_starts_at_the_calibrated_fraction(key, small_data, tiny_models):
    teacher, student = tiny_models
    cfg = TrainConfig(iterations=1, batch_size=4, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    probe = probe_batch(student, teacher, small_data["train"], cfg, "cpu")
    d = build_distiller(
        key,
        student_channels=[32] * 5,
        teacher_channels=[64] * 5,
        num_classes=10,
        probe=probe,
        fraction=0.5,
        seed=0,
    )
    # probing left the student exactly as built (BatchNorm running statistics included)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    s_out, t_out, det = probe()
    with torch.no_grad():
        value, terms = d(s_out, t_out)
    assert set(terms) == set(METHODS[key].terms)
    for name, v in terms.items():
        assert v == pytest.approx(0.5 * float(det), rel=1e-4), name
    assert float(value) == pytest.approx(0.5 * float(det) * len(terms), rel=1e-4)


def test_teacher_cache_is_keyed_and_reused(small_data, tmp_path):
    cfg = DetectorConfig(backbone=STUDENT)  # any detector config: small and fast
    tcfg = TrainConfig(iterations=2, batch_size=4, warmup=1)
    logs = []
    m1, r1 = load_or_train_teacher(cfg, SMALL, tcfg, small_data["train"], tmp_path, progress=False, log=logs.append)
    m2, r2 = load_or_train_teacher(cfg, SMALL, tcfg, small_data["train"], tmp_path, progress=False, log=logs.append)
    assert not r1["cached"] and r2["cached"] and r1["hash"] == r2["hash"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    _, r3 = load_or_train_teacher(
        cfg,
        SMALL,
        TrainConfig(iterations=3, batch_size=4, warmup=1),
        small_data["train"],
        tmp_path,
        progress=False,
        log=logs.append,
    )
    assert not r3["cached"] and r3["hash"] != r1["hash"]
    assert not m2.training and not any(p.requires_grad for p in m2.parameters())


def test_attention_picture_shows_the_masks_of_the_configured_loss(small_data, tiny_models, tmp_path):
    from famkd_losses import FULL_METHOD
    from famkd_losses.demo.methods import FAMKD_DEFAULTS
    from famkd_losses.demo.report import _attention_options, _teacher_masks, plot_attention
    from famkd_losses.functional import num_masked
    from famkd_losses.integrations.torchvision import teacher_outputs

    teacher, _ = tiny_models
    images, targets = small_data["test"].batch([0], "cpu")
    feats = teacher_outputs(teacher, images, targets).features
    # the defaults: the channel branch alone, at scale 1, hiding the least salient channels
    masks = _teacher_masks(feats, 0, _attention_options(FAMKD_DEFAULTS), seed=0)
    assert len(masks) == len(feats)
    for per_scale in masks:
        assert set(per_scale) == {1} and "spatial" not in per_scale[1]
        att, mask = per_scale[1]["channel"]
        c = len(att)
        hidden = mask == 0
        assert hidden.sum() == num_masked(c, FAMKD_DEFAULTS["ratio_ch"])
        assert att[hidden].max() <= att[~hidden].min()
    # the first reading: both branches, the scales that fit each level
    masks = _teacher_masks(feats, 0, _attention_options(FULL_METHOD), seed=0)
    for feat, per_scale in zip(feats, masks):
        assert set(per_scale) == {s for s in (1, 2, 4) if s <= min(feat.shape[-2:])}
        for entry in per_scale.values():
            att, mask = entry["spatial"]
            assert (mask == 0).sum() == num_masked(att.size, FULL_METHOD["ratio_sp"])
    for options in (FAMKD_DEFAULTS, FULL_METHOD):
        (path,) = plot_attention(teacher, small_data["test"], [0], tmp_path, options=options)
        assert path.name == "attention_test0.png" and path.stat().st_size > 0


# ---------------------------------------------------------------- the whole demo


@pytest.mark.slow
def test_default_schedules_per_detector_and_overrides():
    from famkd_losses.demo.pipeline import DemoConfig

    fcos, retina = DemoConfig.preset(), DemoConfig.preset(detector="retinanet")
    assert (fcos.teacher_iters, fcos.student_iters) == (1000, 500)
    assert (retina.teacher_iters, retina.student_iters) == (3000, 1000)
    assert DemoConfig.preset(detector="retinanet", student_iters=200).student_iters == 200
    assert DemoConfig.preset(quick=True, detector="retinanet").student_iters == 40


def test_quick_demo_end_to_end(tmp_path):
    from famkd_losses.demo.__main__ import main

    out = tmp_path / "out"
    rc = main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "results.json").read_text())
    keys = [r["key"] for r in summary["rows"]]
    assert keys == ["teacher", "student", "mgd", "fgd", "famkd_feature", "famkd_logits", "famkd", "control"]
    for row in summary["rows"]:
        for name in ("AP", "AP50", "AP75"):
            assert row["mean"][name] is not None and math.isfinite(row["mean"][name]), (row["key"], name)
        assert row["iterations"] > 0 and row["wall_s"] > 0
    control = summary["rows"][-1]
    assert control["iterations"] >= summary["rows"][1]["iterations"]
    assert summary["all_finite"]
    assert min(summary["positives"]["positive_locations"]) > 0
    for name in ("results.md", "results.json", "curves.json", *summary["plots"]):
        assert (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "equal schedule" in md and "equal wall-clock time" in md
    assert "Smoke run (`--quick`), not evidence" in md
    for name in summary["plots"]:
        assert re.search(rf"!\[[^\]]*\]\({re.escape(name)}\)", md), name  # embedded, relative link
    assert len(list(out.glob("attention_test*.png"))) >= 1
    assert len(list((tmp_path / "cache").glob("teacher-fcos-*.pt"))) == 1
