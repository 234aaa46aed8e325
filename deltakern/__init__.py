"""deltakern: fused ΔEnergy OOD scoring for vision-language models.

Public names only; everything else lives in its own module. Importing deltakern needs neither
a GPU, nor Triton, nor the compiled extension, and never initialises CUDA.
"""

from .scoring import (
    Scores,
    available_backends,
    delta_energy,
    energy,
    max_logit,
    mcm,
    msp,
    score,
)

__version__ = "0.1.0"

__all__ = [
    "Scores",
    "available_backends",
    "delta_energy",
    "energy",
    "max_logit",
    "mcm",
    "msp",
    "score",
    "__version__",
]
