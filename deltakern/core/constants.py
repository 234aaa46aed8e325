"""Names and numbers shared across layers, defined once (docs/conventions.md gives their meaning)."""

from __future__ import annotations

import torch

#: Scoring backends accepted by ``dk.score`` (``auto`` picks one of the others).
BACKENDS = ("auto", "triton", "cpp", "reference")
#: The image normalisation of OpenAI's CLIP (open_clip's default): per-channel RGB mean and std.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ΔEnergy modes (docs/conventions.md §2).
MODES = ("separate", "joint")
#: The largest ``c`` the Triton kernel handles (its top-c list lives in registers); larger ``c``
#: falls back to the reference backend.
TRITON_MAX_C = 16
#: Autocast precisions of the encoders (image encoding, prompt tuning).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Products of float32 inputs, in the words of torch.set_float32_matmul_precision: "highest" keeps
# float32-level accuracy (the default); "high" and "medium" allow TF32 on CUDA and bfloat16 GEMMs
# on CPUs with native bf16 (docs/conventions.md §3.4).
MATMUL_PRECISIONS = ("highest", "high", "medium")
#: Environment variable: seconds a torchrun process group waits for its peers.
DIST_TIMEOUT_ENV = "DELTAKERN_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 7200.0

#: The accuracy contract (docs/conventions.md §3): every score within this relative or
#: absolute error (whichever is larger) of a float64 evaluation of the same inputs.
SCORE_TOLERANCE = {
    torch.float32: 1e-4,
    torch.float64: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 2e-3,
}


def score_tolerance(dtype: torch.dtype | str) -> float:
    """The contract's tolerance for inputs of ``dtype`` (a torch dtype or its name)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return SCORE_TOLERANCE[dtype]

# The largest 1/τ any path accepts: logits are at most 1/τ in magnitude (cosines times 1/τ), and
# with half of float32's range as the bound they, their base-2 form in the Triton kernel
# (times log2(e) < 2) and their log-sum-exps stay finite. A smaller τ (below ~5.9e-39) would
# make every logit inf and every score or loss NaN, on every device.
MAX_INV_TEMPERATURE = float(torch.finfo(torch.float32).max) / 2
MIN_TEMPERATURE = 1.0 / MAX_INV_TEMPERATURE
