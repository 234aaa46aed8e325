"""ΔEnergy and Energy as pytorch-ood (0.4) detectors for CLIP features.

The detectors follow pytorch-ood's ``FeaturesDetector`` contract the way its own ``MCM`` does:

* ``DeltaEnergy(encoder, text_embeddings, c=1, mode="separate", reset=0.0, temperature=0.01)``
  and ``Energy(encoder, text_embeddings, temperature=0.01)``; ``encoder`` is an image encoder
  (e.g. CLIP's ``encode_image``) or ``None`` when only ``predict_features`` is used;
* ``predict(x)`` runs the encoder (without gradients), ``predict_features(z)`` scores image
  features ``z [B, D]`` against ``text_embeddings [K, D]``;
* pytorch-ood's sign: **larger = more OOD**. The outlier score is the negated deltakern score
  (deltakern's scores are higher = ID, docs/conventions.md §2.3), so every ranking, and every
  metric once the roles are mapped, is exactly deltakern's;
* ``info`` metadata, ``requires_fit = False`` and a ``hyperparameter_space`` for pytorch-ood's
  ``GridSearch``.

Scores come from :func:`deltakern.score` (one fused pass that never stores the ``[B, K]``
logits); :meth:`DeltaEnergy.predict_all` returns every score of that one pass.

This module imports pytorch-ood; ``import deltakern`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

try:
    from pytorch_ood.api import DetectorInfo, FeaturesDetector, ModelNotSetException, Paper, Task
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without pytorch-ood
    raise ModuleNotFoundError(
        "deltakern.integrations.pytorch_ood needs pytorch-ood: pip install pytorch-ood==0.4.0",
        name=exc.name,
    ) from exc

from deltakern import scoring
from deltakern.core.constants import BACKENDS, MODES
from deltakern.core.errors import InvalidArgument
from deltakern.core.state import Scores
from deltakern.core.validation import (
    check_choice,
    check_finite_number,
    check_int_range,
    check_matrix,
    check_positive,
    check_values,
)

__all__ = ["DeltaEnergy", "Energy"]

_DELTA_ENERGY_PAPER = Paper(
    title="ΔEnergy: Optimizing Energy Change During Vision-Language Alignment Improves both "
    "OOD Detection and OOD Generalization",
    venue="NeurIPS",
    year=2025,
    url="https://arxiv.org/abs/2510.11296",
)
_ENERGY_PAPER = Paper(
    title="Energy-based Out-of-distribution Detection",
    venue="NeurIPS",
    year=2020,
    url="https://arxiv.org/abs/2010.03759",
    code="https://github.com/wetliu/energy_ood",
)

# The outlier scores predict_all returns: name -> deltakern Scores field (negated).
OUTLIER_FIELDS = ("delta_energy", "energy", "max_logit", "msp")


class _CLIPFeaturesDetector(FeaturesDetector):
    """What both detectors share: the text embeddings, the scoring settings and their checks."""

    requires_fit = False
    _SETTINGS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None,
        text_embeddings: torch.Tensor,
        **settings: Any,
    ) -> None:
        super().__init__()
        if encoder is not None and not callable(encoder):
            raise InvalidArgument(f"encoder must be callable or None, got {type(encoder).__name__}", param="encoder")
        self.encoder = encoder
        self.text_embeddings = check_values("text_embeddings", check_matrix("text_embeddings", text_embeddings), normalize=True)
        for name, value in self._checked(settings).items():
            setattr(self, name, value)

    def _checked(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` validated (the same rules as :func:`deltakern.score`)."""
        out = {}
        for name, value in settings.items():
            if name == "c":
                out[name] = check_int_range("c", value, 1, self.text_embeddings.shape[0])
            elif name == "mode":
                out[name] = check_choice("mode", value, MODES)
            elif name == "reset":
                out[name] = check_finite_number("reset", value)
            elif name == "temperature":
                out[name] = check_positive("temperature", value)
            elif name == "backend":
                out[name] = check_choice("backend", value, BACKENDS)
            else:  # pragma: no cover - the constructors pass only known names
                raise InvalidArgument(f"unknown setting {name!r}", param=name)
        return out

    def set_hyperparameters(self, **kwargs: Any):
        """Set tunable hyperparameters by name (pytorch-ood's API, used by ``GridSearch``).

        Values are checked before any is set, so a bad value leaves the detector unchanged.
        Unknown names raise ``ValueError`` as in pytorch-ood.
        """
        unknown = [k for k in kwargs if k not in self.hyperparameter_space]
        if unknown:
            raise InvalidArgument(
                f"unknown hyperparameter {unknown[0]!r} for {type(self).__name__}; "
                f"known hyperparameters: {list(self.hyperparameter_space)}",
                param=unknown[0],
            )
        for name, value in self._checked(kwargs).items():
            setattr(self, name, value)
        return self

    def scores(self, z: torch.Tensor) -> Scores:
        """Every deltakern score of image features ``z [B, D]`` (higher = ID) from one fused pass."""
        settings = {name: getattr(self, name) for name in self._SETTINGS}
        device = self.device
        if device is not None and isinstance(z, torch.Tensor):
            z = z.to(device)  # as pytorch-ood's predict_features wrapper does
        with torch.no_grad():  # OOD scores carry no gradient; no graph is built
            return scoring.score(z, self.text_embeddings, **settings)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Outlier scores ``[B]`` of raw inputs ``x`` passed through ``encoder``; larger = more OOD.

        Raises pytorch-ood's ``ModelNotSetException`` when the detector has no encoder.
        """
        if self.encoder is None:
            raise ModelNotSetException
        device = self.device
        if device is not None and isinstance(x, torch.Tensor):
            x = x.to(device)
        return self.predict_features(self.encoder(x))


class DeltaEnergy(_CLIPFeaturesDetector):
    """ΔEnergy (Zhu et al., NeurIPS 2025) for CLIP features, as a pytorch-ood detector.

    ΔEnergy is the change of the energy ``LSE(logits)`` when the top-``c`` logits are reset to
    ``reset`` (a cosine value), with logits ``cos(z, t_k) / temperature``; ``mode="separate"``
    sums the ``c`` single resets, ``"joint"`` resets them together (docs/conventions.md §2).
    The outlier score is ``-ΔEnergy`` (larger = more OOD, pytorch-ood's convention).

    :param encoder: image encoder (e.g. CLIP's ``encode_image``), or ``None`` to use
        ``predict_features`` only
    :param text_embeddings: class text embeddings ``[K, D]`` (normalised internally)
    :param c: how many top logits are reset, ``1 <= c <= K``
    :param mode: ``"separate"`` or ``"joint"``
    :param reset: the cosine value a reset logit takes
    :param temperature: τ, cosines are divided by it (0.01 = CLIP's logit scale 100)
    :param backend: deltakern backend, ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"reference"``
    """

    info = DetectorInfo(paper=_DELTA_ENERGY_PAPER, tasks={Task.CLASSIFICATION})
    # c values a grid search tries; pass hyperparameter_space= to GridSearch when K < 10 or to
    # search mode or reset as well.
    hyperparameter_space: ClassVar[dict[str, list]] = {"c": [1, 2, 3, 5, 10]}
    _SETTINGS = ("c", "mode", "reset", "temperature", "backend")

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None,
        text_embeddings: torch.Tensor,
        c: int = 1,
        mode: str = "separate",
        reset: float = 0.0,
        temperature: float = 0.01,
        backend: str = "auto",
    ) -> None:
        super().__init__(encoder, text_embeddings, c=c, mode=mode, reset=reset, temperature=temperature, backend=backend)

    def predict_features(self, z: torch.Tensor) -> torch.Tensor:
        """Outlier scores ``-ΔEnergy`` ``[B]`` of image features ``z [B, D]``; larger = more OOD."""
        return -self.scores(z).delta_energy

    def predict_all(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outlier scores (larger = more OOD) of ΔEnergy, energy, max-logit and MSP from ONE
        fused pass over ``z [B, D]``: ``{name: -score}`` with the detector's settings."""
        s = self.scores(z)
        return {name: -getattr(s, name) for name in OUTLIER_FIELDS}


class Energy(_CLIPFeaturesDetector):
    """The energy score ``LSE(cos(z, t_k) / temperature)`` (Liu et al., NeurIPS 2020) of CLIP
    features against class text embeddings, from deltakern's fused pass, as a pytorch-ood
    detector. The outlier score is ``-energy`` (larger = more OOD).

    :param encoder: image encoder, or ``None`` to use ``predict_features`` only
    :param text_embeddings: class text embeddings ``[K, D]`` (normalised internally)
    :param temperature: τ, cosines are divided by it (0.01 = CLIP's logit scale 100)
    :param backend: deltakern backend, as for :class:`DeltaEnergy`
    """

    info = DetectorInfo(paper=_ENERGY_PAPER, tasks={Task.CLASSIFICATION})
    hyperparameter_space: ClassVar[dict[str, list]] = {"temperature": [0.01, 0.02, 0.05, 0.1, 1.0]}
    _SETTINGS = ("temperature", "backend")

    def __init__(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None,
        text_embeddings: torch.Tensor,
        temperature: float = 0.01,
        backend: str = "auto",
    ) -> None:
        super().__init__(encoder, text_embeddings, temperature=temperature, backend=backend)

    def predict_features(self, z: torch.Tensor) -> torch.Tensor:
        """Outlier scores ``-energy`` ``[B]`` of image features ``z [B, D]``; larger = more OOD."""
        return -self.scores(z).energy
