"""Plain-PyTorch scoring and EBM loss, written straight from docs/conventions.md: the oracles
the fused paths are tested against and the fallbacks when no compiled kernel can run."""

from deltakern.reference.loss import ebm_loss_reference, per_row_parts
from deltakern.reference.scoring import score_state, top_c

__all__ = ["ebm_loss_reference", "per_row_parts", "score_state", "top_c"]
