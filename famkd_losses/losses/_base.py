"""The base every loss shares: the parts of the last call, for logging."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DistillationLoss"]


class DistillationLoss(nn.Module):
    """An ``nn.Module`` loss that remembers the parts of its last call (see :meth:`last_terms`)."""

    def __init__(self) -> None:
        super().__init__()
        self._last_terms: dict[str, Tensor] = {}

    def _record(self, terms: dict[str, Tensor]) -> None:
        self._last_terms = {k: v.detach() for k, v in terms.items()}

    def last_terms(self, as_float: bool = False) -> dict[str, Tensor] | dict[str, float]:
        """The parts of the last call: detached scalars keyed by name, ``"total"`` always present.

        ``as_float=True`` returns Python floats (JSON-ready; this synchronises with the GPU).
        """
        if as_float:
            return {k: float(v) for k, v in self._last_terms.items()}
        return dict(self._last_terms)
