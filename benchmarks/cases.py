"""Benchmark cases: the shapes of real detectors (COCO at 1333x800, padded to 1344x800, FPN P3-P7)
and a small and a large case. On CPU every case is scaled down (spatial /4, channels /4) so the
suite finishes in minutes; the JSON records the shapes that were actually run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COCO_LEVELS = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    student_channels: int
    teacher_channels: int
    levels: list[tuple[int, int]] = field(default_factory=list)
    logit_channels: int = 80  # A*K per location
    num_classes: int = 80

    def scaled(self, spatial: int, channels: int) -> Case:
        """A smaller copy for CPU runs: spatial sizes and channels divided (at least 1 / 4)."""
        return Case(
            name=self.name,
            batch=self.batch,
            student_channels=max(4, self.student_channels // channels),
            teacher_channels=max(4, self.teacher_channels // channels),
            levels=[(max(1, h // spatial), max(1, w // spatial)) for h, w in self.levels],
            logit_channels=max(self.num_classes // channels, 1) * (self.logit_channels // self.num_classes),
            num_classes=max(self.num_classes // channels, 1),
        )

    def as_dict(self) -> dict:
        return asdict(self)


CASES = [
    Case("fcos_coco_b2", 2, 256, 256, COCO_LEVELS, logit_channels=80, num_classes=80),
    Case("retinanet_coco_b2", 2, 256, 256, COCO_LEVELS, logit_channels=720, num_classes=80),
    Case("retinanet_coco_b2_cs128", 2, 128, 256, COCO_LEVELS, logit_channels=720, num_classes=80),
    Case("small_b8", 8, 64, 64, [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)], logit_channels=80, num_classes=80),
    Case("fcos_coco_b8", 8, 256, 256, COCO_LEVELS, logit_channels=80, num_classes=80),
]


def case_by_name(name: str) -> Case:
    return next(c for c in CASES if c.name == name)
