"""deltakern: fused ΔEnergy OOD scoring for vision-language models.

Public names only; everything else lives in its own module. Importing deltakern needs neither
a GPU, nor Triton, nor the compiled extension, and never initialises CUDA.
"""

from deltakern import metrics
from deltakern._version import __version__
from deltakern.loss import EBMLoss, ebm_loss
from deltakern.scoring import (
    Scores,
    available_backends,
    delta_energy,
    energy,
    max_logit,
    mcm,
    msp,
    score,
    score_modes,
)

__all__ = [
    "EBMLoss",
    "Scores",
    "available_backends",
    "delta_energy",
    "ebm_loss",
    "energy",
    "max_logit",
    "mcm",
    "metrics",
    "msp",
    "score",
    "score_modes",
    "__version__",
]
