"""The base every loss shares: the parts of the last call, for logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DistillationLoss"]


class DistillationLoss(nn.Module):
    """An ``nn.Module`` loss that remembers the parts of its last call (see `last_terms`)."""

    def __init__(self) -> None:
        super().__init__()
        self._last_terms: dict[str, Tensor] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # backend="compile": the whole forward under torch.compile, compiled on the first call
        # (losses nested in a compiled one run inside its graph).
        if self.__dict__.get("backend") == "compile" and not torch.compiler.is_compiling():
            compiled = self.__dict__.get("_compiled_forward")
            if compiled is None:
                compiled = self.__dict__["_compiled_forward"] = torch.compile(self.forward)
            return compiled(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_compiled_forward", None)  # rebuilt on the next call
        return state

    def _record(self, terms: dict[str, Tensor | Callable[[], Tensor]]) -> None:
        """Keep this call's parts for `last_terms`: tensors (detached), or zero-argument functions
        of detached tensors for parts that only logging needs (computed on first read: no launch
        in the training step)."""
        self._last_terms = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}

    def _recorded(self) -> dict[str, Tensor | Callable[[], Tensor]]:
        """The recorded parts as kept (lazy ones not computed): for a parent loss to pass on."""
        return dict(self._last_terms)

    def last_terms(self, as_float: bool = False) -> dict[str, Tensor] | dict[str, float]:
        """The parts of the last call: detached scalars keyed by name, ``"total"`` always present.

        They are detached views of the call's own tensors (no copies, no launches): an in-place
        change of the returned loss (``loss /= n``) shows in them, and in ``"total"`` always. Scale
        the loss out of place (``loss = loss / n``), or read them first.
        ``as_float=True`` returns Python floats (JSON-ready; this synchronises with the GPU).
        """
        for k, v in self._last_terms.items():
            if not isinstance(v, Tensor):  # a lazily recorded part: compute it once
                with torch.no_grad():
                    self._last_terms[k] = v().detach()
        if as_float:
            return {k: float(v) for k, v in self._last_terms.items()}
        return dict(self._last_terms)
