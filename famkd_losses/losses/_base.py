"""The base every loss shares: what its forward takes, and the parts of its last call, for logging."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._common import MASK_STEP

__all__ = ["INPUT_KINDS", "DistillationLoss", "Term", "prefixed_terms"]

INPUT_KINDS = ("features", "logits", "boxes")
"""What a loss's ``forward`` can take: ``"features"`` (student and teacher feature levels),
``"logits"`` (student and teacher class logits), ``"boxes"`` (the teacher's boxes and the input size)."""

Term = Tensor | Callable[[], Tensor]
"""A recorded part: a detached tensor, or a zero-argument function of detached tensors computed on
first read (for parts that only logging needs: no launch in the training step)."""


class DistillationLoss(nn.Module):
    """An ``nn.Module`` loss that remembers the parts of its last call (see `last_terms`).

    A loss class declares `inputs`, what its ``forward`` takes in order (kinds of `INPUT_KINDS`;
    features unless it says otherwise), and `optional_inputs`, the trailing ones it can go
    without. The integrations call a loss with what it declares.
    """

    inputs: ClassVar[tuple[str, ...]] = ("features",)
    optional_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        super().__init__()
        self._last_terms: dict[str, Term] = {}

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

    def _record(self, terms: dict[str, Term]) -> None:
        """Keep this call's parts for `last_terms`: tensors (detached) or lazy parts (see `Term`)."""
        self._last_terms = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}

    def _recorded(self) -> dict[str, Term]:
        """The recorded parts as kept (lazy ones not computed): for a parent loss to pass on."""
        return dict(self._last_terms)

    def _forward_child(self, child: DistillationLoss, *args: Any, **kwargs: Any) -> Any:
        """``child(*args, **kwargs)``, its parts of the call recorded as this loss's own."""
        out = child(*args, **kwargs)
        self._record(child._recorded())
        return out

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


def prefixed_terms(prefix: str, loss: DistillationLoss, *, with_total: bool = True) -> dict[str, Term]:
    """``loss``'s recorded parts under ``prefix``: its ``"total"`` as ``prefix`` (left out unless
    ``with_total``), every other part ``p`` as ``prefix/p``; lazy parts stay lazy."""
    terms: dict[str, Term] = {}
    for key, value in loss._recorded().items():
        if key != "total":
            terms[f"{prefix}/{key}"] = value
        elif with_total:
            terms[prefix] = value
    return terms
