"""Encode and score image collections: streaming, resumable, crash-safe, sharded across torchrun
ranks (``deltakern.pipeline.engine`` says how). A run takes one frozen settings object:

    from deltakern.pipeline import ScoreSettings, run_score
    run_score(ScoreSettings(images="photos/", model="ViT-B-32", pretrained="openai",
                            classes="classes.txt", out="scores.parquet"))
"""

from deltakern.pipeline.encode import run_encode
from deltakern.pipeline.parquet import output_paths, scores_schema
from deltakern.pipeline.score import run_score
from deltakern.pipeline.settings import FEATURE_DTYPES, EncodeSettings, RunOptions, ScoreSettings
from deltakern.runtime import TIMING_KEYS

__all__ = [
    "FEATURE_DTYPES", "TIMING_KEYS", "EncodeSettings", "RunOptions", "ScoreSettings", "output_paths", "run_encode",
    "run_score", "scores_schema",
]
