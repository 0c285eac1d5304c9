"""The YOLO teacher and student: ultralytics' bundled YOLOv8 model yaml at small depth and width multiples.

ultralytics scales one architecture file (``cfg/models/v8/yolov8.yaml``) by ``depth_multiple``
(repeats of the C2f blocks) and ``width_multiple`` (channels); its named scales are n = (0.33,
0.25), s = (0.33, 0.50), and so on. The demo writes the same file with its own multiples (and
``nc = 10``, the digits) to a yaml of its own, so that ``YOLO(path)`` builds exactly that model
with nothing downloaded. At 128-pixel inputs the default teacher is YOLOv8n (3.0 M parameters)
and the student the same network at half its width (0.9 M): the student's neck gives 32 / 64 /
128 channels at strides 8 / 16 / 32, the teacher's 64 / 128 / 256.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .train import config_hash

__all__ = ["YoloModelSpec", "YOLO_TEACHER", "YOLO_STUDENT", "model_yaml", "write_model_yaml"]


@dataclass(frozen=True)
class YoloModelSpec:
    """A model built from ultralytics' bundled ``<family>.yaml`` with these multiples (``nc`` classes)."""

    family: str = "yolov8"
    depth: float = 0.33
    width: float = 0.25
    nc: int = 10

    @property
    def name(self) -> str:
        return f"{self.family}-d{self.depth:g}-w{self.width:g}"

    def to_dict(self) -> dict:
        return asdict(self)


YOLO_TEACHER = YoloModelSpec(width=0.25)  # YOLOv8n's multiples
YOLO_STUDENT = YoloModelSpec(width=0.125)  # YOLOv8n at half its width


def _bundled_yaml(family: str) -> Path:
    import ultralytics

    matches = sorted((Path(ultralytics.__file__).parent / "cfg" / "models").glob(f"*/{family}.yaml"))
    if not matches:
        raise FileNotFoundError(f"ultralytics {ultralytics.__version__} bundles no model yaml named {family}.yaml")
    return matches[0]


def model_yaml(spec: YoloModelSpec) -> dict:
    """The bundled yaml of ``spec.family`` with its ``scales`` replaced by ``spec``'s multiples and ``nc``."""
    import yaml

    d = yaml.safe_load(_bundled_yaml(spec.family).read_text())
    d.pop("scales", None)  # with no scales, ultralytics reads depth_multiple / width_multiple
    d.update(nc=spec.nc, depth_multiple=spec.depth, width_multiple=spec.width)
    return d


def write_model_yaml(spec: YoloModelSpec, folder: Path) -> Path:
    """Write `model_yaml` of ``spec`` under ``folder`` (named by the spec and a hash of the yaml); return the path.

    The file name never looks like a bundled scale (``yolov8n.yaml``): ultralytics would read a
    scale letter from it.
    """
    import yaml

    d = model_yaml(spec)
    path = Path(folder) / f"{spec.name}-{config_hash(d)}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(d, sort_keys=False))
        tmp.replace(path)
    return path
