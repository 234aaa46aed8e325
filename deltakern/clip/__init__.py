"""open_clip models and what is built from them: loading a model with its preprocessing and
tokenizer (``models``), zero-shot class embeddings and their cache (``zeroshot``), mined negative
labels (``negatives``), and the model's image transform as one compiled pass (``preprocess``).
Depends on ``deltakern.core``, the compiled ops and ``deltakern.data``; no import runs at package
import time, so ``import deltakern.clip`` does not load open_clip."""
