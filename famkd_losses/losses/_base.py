"""The base every loss shares: the parts of the last call, for logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import MASK_STEP

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

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # the mask stream's step is counted on the host; the buffer gets it when it is saved
        counter = self._buffers.get(MASK_STEP)
        source = self.__dict__.get("_random")
        if counter is not None and source is not None and counter.device.type != "meta":
            with torch.no_grad():
                counter.fill_(source.step)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        # The mask stream's step (buffer "mask_step" of seeded random-mask modules, see
        # `register_mask_step`): restored with the buffer. It is not a learned value, so a
        # state_dict without it (saved before it existed, or by a module without a seed) loads,
        # and so does one with it into a module that has none.
        key = prefix + MASK_STEP
        given = key in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        counter = self._buffers.get(MASK_STEP)
        source = self.__dict__.get("_random")
        if counter is not None and source is not None:
            if given:
                if counter.device.type != "meta":
                    source.step = int(counter)
            elif key in missing_keys:
                missing_keys.remove(key)
        elif given and key in unexpected_keys:
            unexpected_keys.remove(key)

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
