"""``python -m famkd_losses.demo`` / ``famkd-demo``: train, distil, evaluate, report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..calibration import calibrate_weights  # noqa: F401  (fails early if the package is broken)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="famkd-demo",
        description=(
            "Distil a torchvision FCOS teacher into a narrower student on MNIST-digit canvases: the student "
            "alone, + MGD, + FGD, + the FAMKD feature part, logits part and both, at an equal schedule, and the "
            "student alone at the wall time of the slowest distilled run. COCO AP on the test split; tables and "
            "plots in --out. Default: about 12 minutes on 2 CPU cores, 9.4 once the teacher (trained on the "
            "first run, about 2.6 of them) is cached. On a busy machine pass --threads 1: with the cores loaded, "
            "two torch threads ran 6x slower than one."
        ),
    )
    p.add_argument(
        "--protocol",
        choices=("schedule", "plateau"),
        default="schedule",
        help="schedule (default): every method at one short schedule, plus the equal-wall-time control; "
        "plateau: teacher and students trained to their plateau on a long decaying schedule, val AP curves, "
        "3 seeds (FCOS; about 2 hours on 2 CPU cores, --quick under 3 minutes)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default ./famkd_demo_out or ./famkd_plateau_out)"
    )
    p.add_argument("--quick", action="store_true", help="tiny data and few iterations (< 3 min): a smoke run")
    p.add_argument(
        "--seeds", type=int, default=None, help="training seeds per student run (mean and std); default 1, plateau 3"
    )
    p.add_argument("--seed", type=int, default=0, help="first training seed (default 0)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the canvases (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--detector",
        choices=("fcos", "retinanet", "yolo"),
        default="fcos",
        help="fcos (default), retinanet (trains 3000 / 1000 iterations: about 50 min on 2 CPU cores), or yolo: "
        "YOLOv8 students through ultralytics' own trainer, alone, with its built-in distillation and with "
        "FAMKD, MGD, CWD, 3 seeds (needs the ultralytics extra; 30 to 60 min on 2 CPU cores by machine, "
        "--quick under 3)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "compile", "triton"),
        default="auto",
        help="backend of every loss (default auto: the fused Triton kernels on CUDA when triton is importable, "
        "the PyTorch reference otherwise)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also vary FAMKD's scales, mask_mode, ratios, branches, guidance and weights one at a time, "
        "select on the val split, test the selection once (about 20 more minutes on 2 cores)",
    )
    p.add_argument(
        "--kd-fraction",
        type=float,
        default=None,
        help="each distillation term starts at this fraction of the detection loss (default 1.0)",
    )
    p.add_argument("--teacher-iters", type=int, default=None)
    p.add_argument("--student-iters", type=int, default=None)
    p.add_argument("--teacher-epochs", type=int, default=None, help="yolo: teacher epochs (default 10)")
    p.add_argument("--student-epochs", type=int, default=None, help="yolo: epochs of every student run (default 2)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher cache (default ~/.cache/famkd-losses/demo)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument(
        "--parts",
        default=None,
        help="plateau: which groups of runs, comma-separated, of main (student, + MGD, + FAMKD over the seeds, "
        "+ FGD), ablation (FAMKD's scales and branches, val), diagnosis (FAMKD with a decaying distillation "
        "weight, its two parts alone, a logits term at 0.1x) and length (student, + FAMKD, + MGD at twice the "
        "students' schedule); default main,ablation",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="plateau: the runs of the main and length parts, comma-separated (default: main "
        "student,famkd,mgd,fgd; length student,famkd,mgd; fgd over the first seed only, in both parts); "
        "e.g. famkd_feature to add FAMKD's feature part",
    )
    p.add_argument(
        "--length-seeds",
        type=int,
        default=None,
        help="plateau: the length part over the first N training seeds (default 1)",
    )
    p.add_argument(
        "--ablation-factor",
        type=int,
        default=None,
        help="plateau: the ablation part at N x the students' schedule (default 1; 2: the length part's)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="plateau: reuse the finished runs of --out's results.json (same sizes and schedule) and train only "
        "the rest; its runs outside --parts stay in the report",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="plateau: student runs trained at once in worker processes (default 1); the torch threads are "
        "shared among them",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from .pipeline import DemoConfig, run_demo
    except ImportError as err:
        print(f"famkd-demo needs the demo extra: pip install 'famkd-losses[demo]' ({err})", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda was asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.protocol == "plateau":
        return _plateau(args, start)
    if args.detector == "yolo":
        return _yolo(args, start)
    cfg = DemoConfig.preset(
        args.quick,
        out=args.out or Path("famkd_demo_out"),
        detector=args.detector,
        ablation=args.ablation,
        teacher_iters=args.teacher_iters,
        student_iters=args.student_iters,
        **_shared_options(args),
    )
    summary = run_demo(_with_data_seed(cfg, args))
    return _finish(cfg.out, start, summary["all_finite"])


def _shared_options(args: argparse.Namespace) -> dict:
    """The options every protocol's config takes (None: the protocol's default)."""
    return {
        "seeds": args.seeds,
        "seed": args.seed,
        "device": args.device,
        "backend": args.backend,
        "kd_fraction": args.kd_fraction,
        "batch_size": args.batch_size,
        "cache_dir": args.cache_dir,
        "progress": not args.no_progress,
    }


def _with_data_seed(cfg: Any, args: argparse.Namespace) -> Any:
    """``cfg`` with its canvases drawn from ``--data-seed`` when given."""
    from .data import DataConfig

    if args.data_seed is not None:
        cfg.data = DataConfig(**{**cfg.data.to_dict(), "seed": args.data_seed})
    return cfg


def _finish(out: Path, start: float, all_finite: bool) -> int:
    """Print the run's results.md and where its outputs are; exit code 0 when every metric is finite."""
    print()
    print((Path(out) / "results.md").read_text())
    print(f"outputs in {Path(out).resolve()} ({time.perf_counter() - start:.0f} s)")
    return 0 if all_finite else 1


def _comma_list(option: str, value: str, known: Sequence[str]) -> tuple[str, ...]:
    """The names in ``value`` ("a,b"), each one of ``known``, in their order; exits naming ``option`` otherwise."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names or any(name not in known for name in names):
        raise SystemExit(f"{option} takes {', '.join(known)} (comma-separated); got {value!r}")
    return names


def _plateau_parts(parts: str | None) -> dict[str, bool]:
    if parts is None:
        return {}
    known = ("main", "ablation", "diagnosis", "length")
    names = _comma_list("--parts", parts, known)
    return {name: name in names for name in known}


def _plateau_methods(methods: str | None) -> tuple[str, ...] | None:
    from .methods import METHODS

    return None if methods is None else _comma_list("--methods", methods, ("student", *METHODS))


def _plateau(args: argparse.Namespace, start: float) -> int:
    from .evaluate import finite_metrics
    from .plateau import PlateauConfig, run_plateau

    if args.detector != "fcos":
        print("--protocol plateau runs FCOS only", file=sys.stderr)
        return 2
    cfg = PlateauConfig.preset(
        args.quick,
        out=args.out or Path("famkd_plateau_out"),
        teacher_iters=args.teacher_iters,
        student_iters=args.student_iters,
        jobs=args.jobs,
        resume=args.resume,
        methods=_plateau_methods(args.methods),
        length_seeds=args.length_seeds,
        ablation_factor=args.ablation_factor,
        **_shared_options(args),
        **_plateau_parts(args.parts),
    )
    summary = run_plateau(_with_data_seed(cfg, args))
    runs = [summary["teacher"]["test"], *(r["test"] for r in summary["runs"])]
    return _finish(cfg.out, start, all(finite_metrics(m) for m in runs))


def _yolo(args: argparse.Namespace, start: float) -> int:
    import importlib.util

    if importlib.util.find_spec("ultralytics") is None:
        print("famkd-demo --detector yolo needs ultralytics: pip install 'famkd-losses[ultralytics]'", file=sys.stderr)
        return 2
    if args.ablation or args.teacher_iters or args.student_iters:
        print(
            "--detector yolo counts epochs (--teacher-epochs, --student-epochs) and has no --ablation", file=sys.stderr
        )
        return 2
    from .yolo import YoloConfig, run_yolo

    cfg = YoloConfig.preset(
        args.quick,
        out=args.out or Path("famkd_yolo_out"),
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        **_shared_options(args),
    )
    state = run_yolo(_with_data_seed(cfg, args))
    return _finish(cfg.out, start, state["all_finite"])


if __name__ == "__main__":
    sys.exit(main())
