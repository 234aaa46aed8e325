"""The decoding options of a run (``jpeg_draft``, ``gpu_decode``): their part of the run's
identity, and the check that ``gpu_decode`` has a GPU to run on."""

from __future__ import annotations

from typing import Any

from deltakern.core.errors import InvalidArgument
from deltakern.runtime import Runtime


def decode_identity(settings: Any) -> dict[str, bool]:
    """The ``run.json`` entries of the decoding options that change pixels. Each is named only
    when on, so runs without them keep the identity they had; a resumed run that turns one on
    or off is refused instead of mixing two decodings in one output."""
    return {name: True for name in ("jpeg_draft", "gpu_decode") if getattr(settings, name)}


def check_gpu_decode(settings: Any, rt: Runtime) -> None:
    """``gpu_decode`` needs the run on a CUDA device (nvJPEG decodes into its memory)."""
    if settings.gpu_decode and rt.device.type != "cuda":
        raise InvalidArgument(
            f"gpu_decode needs a CUDA device, the run is on {rt.device.type}", param="gpu_decode"
        )
