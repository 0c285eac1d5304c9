"""`run_eagerly`: run a function eagerly under ``torch.compile`` without importing ``torch._dynamo``
until something else has (importing this package stays cheap)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

_EAGER: dict[Callable, Callable] = {}


def run_eagerly(fn: Callable) -> Callable:
    """``fn``, run eagerly under ``torch.compile`` (one graph break) instead of traced.

    For host-side state such as a call counter, or a check that runs other code on detached
    copies: traced, every new value would be a guard failure and a recompile. ``torch._dynamo``
    is imported only once something else has imported it (``torch.compile`` does), so importing
    this package stays cheap.
    """

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        eager = _EAGER.get(fn)
        if eager is None:
            if "torch._dynamo" not in sys.modules:
                return fn(*args, **kwargs)  # nothing can be compiling
            import torch._dynamo

            eager = _EAGER[fn] = torch._dynamo.disable(fn)
        return eager(*args, **kwargs)

    return inner
