"""Which C++ argument errors of deltakern's ops crash the process (the variant in argv[1]).

The second H200 run called it once per variant, each in a process of its own (run2.sh); this is
the program it ran, with its imports and statements laid out one per line.
"""

import faulthandler
import sys

import torch

import deltakern  # noqa: F401  (loads the extension and registers the ops)
import deltakern.ops.extension as extension

faulthandler.enable()
extension.load()
variant = sys.argv[1]
dev = "cpu" if variant.startswith("cpu") else "cuda"
X = torch.randn(4, 8, device=dev)
W = torch.randn(3, 8, device=dev)
y = torch.tensor([0, 1, 2, 0], device=dev)
f = torch.ops.deltakern.ebm_loss_forward
calls = {
    "cpu_inv_temp": lambda: f(X, W, y, 1e300, 0.0, 4, True, False, True),
    "cuda_inv_temp": lambda: f(X, W, y, 1e300, 0.0, 4, True, False, True),
    "cuda_inv_temp_default_op": lambda: f.default(X, W, y, 1e300, 0.0, 4, True, False, True),
    "cuda_inv_temp_no_grad": lambda: torch.no_grad()(lambda: f(X, W, y, 1e300, 0.0, 4, True, False, True))(),
    "cuda_shape": lambda: f(X, W[:, :5].contiguous(), y, 100.0, 0.0, 4, True, False, True),
    "cuda_device_mix": lambda: f(X, W.cpu(), y, 100.0, 0.0, 4, True, False, True),
    "cuda_mask_count": lambda: f(X, W, y, 100.0, 0.0, 99, True, False, True),
    "cuda_torch_error": lambda: torch.mm(X, W),
    "cuda_nonfinite_row": lambda: f(X.clone().fill_(float("nan")), W, y, 100.0, 0.0, 4, True, False, True),
    "cuda_backward_bad": lambda: torch.ops.deltakern.ebm_loss_backward(
        torch.ones(4, device=dev), torch.ones(3, device=dev), X, W, y, y, torch.ones(4, device=dev),
        torch.ones(4, device=dev), torch.ones(4, device=dev), torch.ones(4, 8, dtype=torch.bool, device=dev),
        100.0, 0.0, False, True, True, True),
    "cuda_score_bad": lambda: torch.ops.deltakern.fused_score_state(
        X.cpu(), W.cpu()[:, :5].contiguous(), 100.0, 1, True, False),
}
try:
    calls[variant]()
    print(variant, "NO ERROR RAISED")
except Exception as ex:  # noqa: BLE001 - the point is what comes back
    print(variant, "raised", type(ex).__name__, str(ex).splitlines()[0][:150])
