"""Losses over FPN levels: the inputs split into levels, one call per level checked against
level 0, the sum, and `LevelLosses`, the container of one single-level loss per level."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

from .._validation import as_levels, check_channel_list, check_level_device, plural
from ._base import DistillationLoss, Term, prefixed_terms

__all__ = [
    "LevelLosses",
    "Levels",
    "channel_pairs",
    "check_one_level",
    "level_key",
    "level_terms",
    "names_levels",
    "sum_terms",
]

T = TypeVar("T")


def level_key(level: int) -> str:
    """The name of level ``level``'s part in `last_terms`: ``"level{l}"``."""
    return f"level{level}"


def level_terms(values: Iterable[Term]) -> dict[str, Term]:
    """One part per level, keyed ``"level{l}"``."""
    return {level_key(i): v for i, v in enumerate(values)}


def sum_terms(terms: Iterable[Tensor]) -> Tensor:
    """``t_0 + t_1 + ...`` in order, starting from the first term itself (no zero to add: one
    launch less per sum)."""
    total: Tensor | None = None
    for term in terms:
        total = term if total is None else total + term
    if total is None:
        raise ValueError("sum_terms needs at least one term")
    return total


def channel_pairs(student_channels: Sequence[int], teacher_channels: Sequence[int]) -> list[tuple[int, int]]:
    """``(Cs_l, Ct_l)`` per level from the two channel lists, which must name the same levels."""
    s_ch = check_channel_list("student_channels", student_channels)
    t_ch = check_channel_list("teacher_channels", teacher_channels)
    if len(s_ch) != len(t_ch):
        raise ValueError(
            f"student_channels and teacher_channels must name the same number of levels, got "
            f"{len(s_ch)} ({s_ch}) and {len(t_ch)} ({t_ch})"
        )
    return list(zip(s_ch, t_ch))


def names_levels(student_channels: Any, teacher_channels: Any) -> bool:
    """Whether a loss's channel arguments name several levels (sequences) rather than one (ints).

    One int beside one sequence is a `TypeError` that names both.
    """
    s_int, t_int = isinstance(student_channels, int), isinstance(teacher_channels, int)
    other = teacher_channels if s_int else student_channels
    if s_int != t_int and isinstance(other, Sequence) and not isinstance(other, str):
        raise TypeError(
            "student_channels and teacher_channels must both be ints (one level) or both sequences (one "
            f"entry per level); got {type(student_channels).__name__} {student_channels!r} and "
            f"{type(teacher_channels).__name__} {teacher_channels!r}"
        )
    return not s_int


def check_one_level(loss_name: str, s_feats: Any, t_feats: Any) -> None:
    """A loss built for one level (int channels) takes one tensor pair, not levels."""
    if isinstance(s_feats, Sequence) or isinstance(t_feats, Sequence):
        raise TypeError(
            f"this {loss_name} was built for one level (int channels), so s_feats and t_feats must be tensors; "
            f"got {type(s_feats).__name__} and {type(t_feats).__name__} (build it with sequences of "
            "channels for several levels)"
        )


@dataclass(frozen=True)
class Levels:
    """A loss's student and teacher inputs, one entry per level (see `split`)."""

    name: str
    """The student argument's name, in messages (``"s_feats"``, ``"s_logits"``)."""
    student: list[Tensor]
    teacher: list[Tensor]
    named: bool
    """Whether messages name every level: a loss built per level always does; a loss of any
    number of levels names none when it was given one tensor pair."""

    @classmethod
    def split(cls, s_name: str, s: Any, t_name: str, t: Any, *, built_for: int | None = None) -> Levels:
        """One tensor pair, two sequences or two mappings of levels (`as_levels`), as levels.

        ``built_for``: the number of levels a per-level loss was built for, which the inputs must have.
        """
        s_list, t_list, single = as_levels(s_name, s, t_name, t)
        if built_for is not None and len(s_list) != built_for:
            raise ValueError(
                f"{s_name} has {plural(len(s_list), 'level')} but this loss was built for {built_for} "
                f"(student_channels has {plural(built_for, 'entry', 'entries')})"
            )
        return cls(s_name, s_list, t_list, named=built_for is not None or not single)

    def __len__(self) -> int:
        return len(self.student)

    def map(self, level_loss: Callable[..., T], *per_level: Sequence[Any], same_batch: bool = False) -> list[T]:
        """``level_loss(S_l, T_l, *(x[l] for x in per_level), level=l)`` for every level, in order
        (``level=None`` where levels are not named).

        After each level's call (its own checks first): its student input is on level 0's device
        and, with ``same_batch``, has level 0's batch size.
        """
        first = self.student[0]
        out = []
        for i, (s, t) in enumerate(zip(self.student, self.teacher)):
            out.append(level_loss(s, t, *(x[i] for x in per_level), level=i if self.named else None))
            check_level_device(self.name, s, i, first, f"{self.name} at level 0")
            if same_batch and s.shape[0] != first.shape[0]:
                raise ValueError(f"batch size at level {i} is {s.shape[0]} but level 0 has {first.shape[0]}")
        return out


class LevelLosses(DistillationLoss, nn.ModuleList):
    """One single-level loss per FPN level (a ``ModuleList``: level l is ``self[l]``), summed.

    ``forward(s_levels, t_levels, *args, **kwargs) = sum_l self[l](S_l, T_l, *args, level=l, **kwargs)``:
    the inputs as `Levels.split` takes them, as many levels as losses. A level's loss may return
    ``(loss, *extra)``: the container then returns ``(total, *extra per level)``, each extra a
    list over the levels. `last_terms` gives ``"total"`` and, per level, the level's own parts
    under ``"level{l}"`` (its ``"total"`` as ``"level{l}"`` itself, unless ``level_totals=False``).

    Args:
        losses: the single-level losses, level 0 first.
        same_batch: every level's student must have level 0's batch size.
        level_totals: keep each level's total among the parts.
    """

    def __init__(self, losses: Iterable[DistillationLoss], *, same_batch: bool = False, level_totals: bool = True):
        super().__init__()
        self.extend(losses)
        self.same_batch = same_batch
        self.level_totals = level_totals

    def forward(self, s_levels: Any, t_levels: Any, *args: Any, **kwargs: Any) -> Tensor | tuple:
        levels = Levels.split("s_feats", s_levels, "t_feats", t_levels, built_for=len(self))

        def call(s: Tensor, t: Tensor, *, level: int) -> Any:
            return self[level](s, t, *args, level=level, **kwargs)

        outputs = levels.map(call, same_batch=self.same_batch)
        with_extra = isinstance(outputs[0], tuple)
        losses = [out[0] for out in outputs] if with_extra else outputs
        total = sum_terms(losses)
        terms: dict[str, Term] = {"total": total}
        for i, loss in enumerate(self):
            terms.update(prefixed_terms(level_key(i), loss, with_total=self.level_totals))
        self._record(terms)
        if with_extra:
            return (total, *(list(extra) for extra in list(zip(*outputs))[1:]))
        return total
