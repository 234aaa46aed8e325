"""Python side of the compiled ops: fake (meta) kernels and thin call wrappers.

The schemas live in csrc/ops.cpp; this module adds what torch.library needs for
``torch.compile`` and ``opcheck`` (shape propagation) and is imported only when the extension
loaded.
"""

from __future__ import annotations

import torch

from . import _ext
from .reference import accumulation_dtype

_registered = False


def ensure_registered() -> bool:
    """Register the fake kernels once; False when the extension is unavailable."""
    global _registered
    if _registered:
        return True
    if not _ext.available():
        return False

    @torch.library.register_fake("deltakern::fused_score_state")
    def _fused_score_state_fake(x, w, inv_temp, c, normalize):
        acc = accumulation_dtype(x, w)
        n = x.shape[0]
        return (
            x.new_empty((n, c), dtype=acc),
            x.new_empty((n, c), dtype=torch.int64),
            x.new_empty((n,), dtype=acc),
        )

    _registered = True
    return True


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when ``deltakern::op_name`` has a kernel for the dispatch key (e.g. "CPU")."""
    if not ensure_registered():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"deltakern::{op_name}", dispatch_key)


def registered_ops() -> dict[str, list[str]]:
    """``{op: [dispatch keys with a kernel]}`` for every deltakern op (for ``deltakern env``)."""
    if not ensure_registered():
        return {}
    from . import loss  # its ops get their fake kernels on first use; list them complete

    loss._register()
    keys = ("CPU", "CUDA", "Meta", "Autograd", "AutogradCPU", "AutogradCUDA")
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("deltakern::")]
    ops = {}
    for name in names:
        ops[name] = [k for k in keys if torch._C._dispatch_has_kernel_for_dispatch_key(f"deltakern::{name}", k)]
    return dict(sorted(ops.items()))


def fused_score_state(
    x: torch.Tensor, w: torch.Tensor, inv_temp: float, c: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Call the compiled ``deltakern::fused_score_state`` op."""
    ensure_registered()
    return torch.ops.deltakern.fused_score_state(x, w, inv_temp, c, normalize)
