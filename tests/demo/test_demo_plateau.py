"""The plateau protocol: periodic evaluation, the teacher's output cache, the plateau check, and a
``--quick`` run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

for _mod in ("torchvision", "mlxtend", "pycocotools", "matplotlib", "tqdm"):
    pytest.importorskip(_mod, reason="the demo extra is not installed")

from famkd_losses.demo.__main__ import _plateau_methods, _plateau_parts  # noqa: E402
from famkd_losses.demo.data import DataConfig, make_dataset  # noqa: E402
from famkd_losses.demo.methods import build_distiller  # noqa: E402
from famkd_losses.demo.models import STUDENT, DetectorConfig, build_detector  # noqa: E402
from famkd_losses.demo.plateau import TeacherCache, plateau_gain  # noqa: E402
from famkd_losses.demo.train import TrainConfig, probe_batch, train  # noqa: E402
from famkd_losses.integrations.torchvision import teacher_outputs  # noqa: E402

SMALL = DataConfig(num_canvases=(24, 8, 8))


@pytest.fixture(scope="module")
def small_data():
    return make_dataset(SMALL)


def test_plateau_gain_is_last_minus_three_quarters():
    curve = [(i * 100, {"AP": float(v)}) for i, v in enumerate([0, 10, 20, 30, 35, 38, 39, 39.5, 40], start=1)]
    # last point 900; 3/4 of it is 675, a quarter of the way from 600 (38.0) to 700 (39.0)
    assert plateau_gain(curve) == pytest.approx(40 - 38.75)
    assert plateau_gain([(10, {"AP": 5.0}), (20, {"AP": 9.0})]) == pytest.approx(2.0)  # 9 - 7, halfway at 15
    assert plateau_gain(curve[:1]) is None


def test_train_evaluates_at_regular_points_and_keeps_it_out_of_wall_time(small_data):
    torch.manual_seed(0)
    model = build_detector(DetectorConfig(backbone=STUDENT))
    calls = []

    def evaluator(m):
        m.eval()  # evaluate() switches modes like this; train() must switch back
        calls.append(1)
        return {"AP": float(len(calls))}

    result = train(
        model,
        small_data["train"],
        TrainConfig(iterations=5, batch_size=4, warmup=1),
        progress=False,
        eval_every=2,
        evaluator=evaluator,
    )
    assert [it for it, _ in result.eval_curve] == [2, 4, 5]
    assert [m["AP"] for _, m in result.eval_curve] == [1.0, 2.0, 3.0]
    assert model.training and result.eval_s >= 0


def test_teacher_cache_gives_the_teachers_outputs(small_data):
    torch.manual_seed(0)
    teacher = build_detector(DetectorConfig(backbone=STUDENT)).eval()
    cache = TeacherCache(teacher, small_data["train"], "cpu", batch_size=5)
    idx = [7, 2, 19, 0]
    images, targets = small_data["train"].batch(idx, "cpu")
    want = teacher_outputs(teacher, images, targets)
    got = cache(idx)
    assert got.image_size == want.image_size
    for a, b in zip(got.features + got.cls_logits, want.features + want.cls_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.boxes, want.boxes):
        assert torch.equal(a, b)


def test_kd_decay_scales_the_distillation_term_like_the_learning_rate(small_data):
    torch.manual_seed(0)
    teacher = build_detector(DetectorConfig(backbone=STUDENT)).eval()
    student = build_detector(DetectorConfig(backbone=STUDENT))
    cfg = TrainConfig(iterations=4, batch_size=4, warmup=1)
    probe = probe_batch(student, teacher, small_data["train"], cfg, "cpu")
    d = build_distiller(
        "mgd", student_channels=[32] * 5, teacher_channels=[32] * 5, num_classes=10, probe=probe, fraction=1.0, seed=0
    )
    result = train(student, small_data["train"], cfg, teacher=teacher, distiller=d, progress=False, kd_decay=True)
    factors = [kd / term for kd, term in zip(result.kd_loss, result.kd_terms["feature"])]
    assert factors == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(0.75 * math.pi))])


def test_plateau_parts_option():
    assert _plateau_parts(None) == {}
    assert _plateau_parts("diagnosis") == {"main": False, "ablation": False, "diagnosis": True, "length": False}
    assert _plateau_parts("main, ablation") == {"main": True, "ablation": True, "diagnosis": False, "length": False}
    assert _plateau_parts("length")["length"]
    assert _plateau_methods("famkd_feature, student") == ("famkd_feature", "student")
    assert _plateau_methods(None) is None
    with pytest.raises(SystemExit, match="--methods takes student, mgd"):
        _plateau_methods("famkd_feat")
    with pytest.raises(SystemExit, match="main, ablation, diagnosis, length"):
        _plateau_parts("mian")


@pytest.mark.slow
def test_quick_plateau_end_to_end(tmp_path):
    from famkd_losses.demo.__main__ import main

    out = tmp_path / "out"
    argv = ["--protocol", "plateau", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    roles = [(r["key"], r["seed"], r["role"]) for r in summary["runs"]]
    assert roles == [
        ("student", 0, "main"),
        ("famkd", 0, "main"),
        ("mgd", 0, "main"),
        ("fgd", 0, "main"),
        ("student", 1, "main"),
        ("famkd", 1, "main"),
        ("mgd", 1, "main"),
        ("famkd", 0, "ablation"),
    ]
    for run in summary["runs"]:
        assert [it for it, _ in run["eval_curve"]] == [15, 30]
        assert all(math.isfinite(run[split]["AP"]) for split in ("val", "test"))
    assert len(summary["teacher"]["eval_curve"]) == 2
    paired = summary["tables"]["paired"]["famkd - student"]
    assert [s for s, _ in paired["per_seed"]] == [0, 1]
    md = (out / "results.md").read_text()
    assert "smoke run" in md and "not evidence" in md and "Paired differences" in md
    assert (out / "val_ap_curves.png").stat().st_size > 0

    # --resume keeps every finished run (none trained again) and adds the longer runs at 2x
    assert main([*argv, "--resume", "--parts", "length"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["runs"][: len(summary["runs"])] == summary["runs"]
    longer = resumed["runs"][len(summary["runs"]) :]
    assert [(r["key"], r["role"], r["iterations"]) for r in longer] == [
        ("student", "length", 60),
        ("famkd", "length", 60),
        ("mgd", "length", 60),
    ]
    assert [it for it, _ in longer[0]["eval_curve"]] == [30, 60]
    assert [e["key"] for e in resumed["tables"]["reference"]] == ["student", "famkd", "mgd"]
    assert resumed["wall_s"] > summary["wall_s"]
    md = (out / "results.md").read_text()
    assert "Students at 2x the students' schedule (60 iterations" in md
    assert md.index("(60 iterations") < md.index("(30 iterations")  # the longer schedule leads
    assert "Every run at 2x the students' schedule, per seed" in md
    assert [r["key"] for r in resumed["tables"]["length_rows"]] == ["student", "famkd", "mgd"]
    assert [s for s, _ in resumed["tables"]["length_paired"]["famkd - student"]["per_seed"]] == [0]


def test_resume_reuses_a_run_trained_under_another_part():
    from famkd_losses.demo.plateau import _Planned, _reuse

    def run(key, seed, role):
        return {"key": key, "seed": seed, "role": role, "options": {}, "kd_decay": False, "iterations": 30}

    plan = [_Planned(k, s, "main", None, False, 30) for s in (0, 1) for k in ("student", "famkd_feature")]
    earlier = [run("student", 0, "main"), run("famkd_feature", 0, "diagnosis"), run("famkd", 0, "ablation")]
    done = _reuse(plan, earlier)
    assert sorted(done) == [-2, -1, 0, 1]  # slots 2, 3 (seed 1) are still to train
    assert done[0] is earlier[0]
    assert done[1] == {**earlier[1], "role": "main"}  # the diagnosis run serves the main part too...
    assert done[-2] is earlier[1] and done[-1] is earlier[2]  # ...and stays where it was


def test_resume_tells_runs_apart_by_their_term_fractions():
    from famkd_losses.demo.plateau import _Planned, _reuse

    base = {"key": "famkd_logits", "seed": 0, "role": "diagnosis", "options": {}, "kd_decay": False, "iterations": 30}
    plan = [_Planned("famkd_logits", 0, "diagnosis", None, False, 30, {"logits": 0.1})]
    assert sorted(_reuse(plan, [base])) == [-1]  # the full-weight run does not answer the lighter one
    assert _reuse(plan, [{**base, "fractions": {"logits": 0.1}}]) == {0: {**base, "fractions": {"logits": 0.1}}}


def test_plan_lighter_logits_terms_and_fgd_over_its_seeds_in_every_part():
    from famkd_losses.demo.plateau import PlateauConfig, _label, _plan

    cfg = PlateauConfig(
        seeds=2, fgd_seeds=1, kd_fraction=0.5, main=False, ablation=False, diagnosis=True, length=True,
        length_seeds=2, methods=("student", "fgd"),
    )  # fmt: skip
    plan = _plan(cfg)
    diagnosis = [p for p in plan if p.role == "diagnosis"]
    lighter = [(p.key, p.fractions) for p in diagnosis if p.fractions]
    assert lighter == [("famkd_logits", {"logits": 0.05}), ("famkd", {"feature": 0.5, "logits": 0.05})]
    assert all(p.seed == 0 and p.iterations == 3000 for p in diagnosis)
    assert [(p.key, p.seed, p.iterations) for p in plan if p.role == "length"] == [
        ("student", 0, 6000),
        ("fgd", 0, 6000),
        ("student", 1, 6000),
    ]
    ablation = _plan(PlateauConfig(main=False, ablation_factor=2, ablation_variants=2))
    assert [(p.key, p.role, p.iterations, p.seed) for p in ablation] == [("famkd", "ablation", 6000, 0)] * 2
    label = _label("famkd", None, fractions={"feature": 0.5, "logits": 0.05})
    assert label.endswith("feature term at 0.5 x the detection loss, logits term at 0.05 x the detection loss")


def test_a_per_term_fraction_sets_each_terms_start(small_data):
    torch.manual_seed(0)
    student = build_detector(DetectorConfig(backbone=STUDENT))
    teacher = build_detector(DetectorConfig(backbone=STUDENT)).eval()
    cfg = TrainConfig(iterations=2, batch_size=4, warmup=1)
    ch = [STUDENT.fpn_channels] * 5
    probe = probe_batch(student, teacher, small_data["train"], cfg, "cpu")
    common = dict(student_channels=ch, teacher_channels=ch, num_classes=10, probe=probe, seed=0)
    one = build_distiller("famkd", fraction=1.0, **common)
    mixed = build_distiller("famkd", fraction={"feature": 1.0, "logits": 0.1}, **common)
    assert mixed.weights["feature"] == pytest.approx(one.weights["feature"])
    assert mixed.weights["logits"] == pytest.approx(0.1 * one.weights["logits"])


def test_resume_refuses_results_of_other_settings(tmp_path):
    from famkd_losses.demo.plateau import PlateauConfig, _earlier_runs

    cfg = PlateauConfig.preset(True, out=tmp_path, resume=True)
    state = {"config": cfg.to_dict()}
    assert _earlier_runs(cfg, state) == ([], 0.0)  # nothing written yet
    other = {**cfg.to_dict(), "student_iters": 31}
    (tmp_path / "results.json").write_text(json.dumps({"config": other, "runs": [{"key": "student"}], "wall_s": 5}))
    with pytest.raises(ValueError, match="student_iters differ"):
        _earlier_runs(cfg, state)
    (tmp_path / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "runs": [{"key": "s"}], "wall_s": 5}))
    assert _earlier_runs(cfg, state) == ([{"key": "s"}], 5.0)


def test_report_reads_each_ablation_against_famkd_at_its_own_schedule():
    from famkd_losses.demo.evaluate import METRICS
    from famkd_losses.demo.plateau import PlateauConfig, results_markdown, summarise

    def run(key, role, iterations, ap, options=None):
        m = dict.fromkeys(METRICS, ap)
        curve = [(iterations // 2, m), (iterations, m)]
        return {"key": key, "role": role, "seed": 0, "iterations": iterations, "options": options or {},
                "label": f"{key} {role} {iterations}", "val": m, "test": m, "eval_curve": curve,
                "median_step_s": 0.1}  # fmt: skip

    runs = [
        run("student", "main", 30, 50.0),
        run("famkd", "main", 30, 51.0),
        run("famkd", "ablation", 30, 52.0, {"scales": [1, 2, 4]}),
        run("student", "length", 60, 53.0),
        run("famkd", "length", 60, 54.0),
        run("famkd", "ablation", 60, 55.0, {"scales": [1, 2, 4]}),
    ]
    m = dict.fromkeys(METRICS, 70.0)
    state = {"teacher": {"params": 1e6, "val": m, "test": m, "last_quarter_gain_val": 0.1}, "runs": runs,
             "device": "cpu", "versions": {"torch": "x"}, "data": "d", "train_canvases": 100, "student_params": 1e5,
             "wall_s": 60.0}  # fmt: skip
    cfg = PlateauConfig(student_iters=30)
    md = results_markdown(cfg, state, summarise(cfg, state))
    at_60 = md[md.index("## FAMKD's main choices at 60 iterations") :]
    at_30 = md[md.index("## FAMKD's main choices at 30 iterations") :]
    assert md.index("at 60 iterations") < md.index("at 30 iterations")
    assert "| defaults | 54.0 |" in at_60.split("\n\n")[1] and "| famkd ablation 60 | 55.0 |" in at_60
    assert "| defaults | 51.0 |" in at_30.split("\n\n")[1] and "| famkd ablation 30 | 52.0 |" in at_30
    assert "| famkd - student | seed 0: +1.0 | +1.0 |" in md  # one seed: no spread to show
