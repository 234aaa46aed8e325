"""OOD evaluation on top of the scores and metrics: evaluation tables (``evaluation``), reports
(``report``), the kNN baseline (``knn``), thresholds (``threshold``) and synthetic CLIP-like data
(``synthetic``). Nothing is imported at package import time."""
