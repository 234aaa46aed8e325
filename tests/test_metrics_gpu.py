"""dk.metrics on CUDA tensors (GPU machines only; no scikit-learn needed here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltakern import metrics as M

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_scores_stay_on_device_and_agree_with_cpu():
    rng = np.random.default_rng(9)
    id_s = rng.integers(0, 100, 5000).astype(np.float32) + 0.5  # many exact ties
    ood_s = rng.integers(0, 100, 4000).astype(np.float32)
    cpu = M.ood_metrics(id_s, ood_s)
    gpu = M.ood_metrics(torch.from_numpy(id_s).cuda(), torch.from_numpy(ood_s).cuda())
    assert gpu == pytest.approx(cpu, rel=1e-12)
    fpr, _, _ = M.roc_curve(torch.from_numpy(id_s).cuda(), torch.from_numpy(ood_s).cuda())
    assert fpr.is_cuda
    with pytest.raises(ValueError, match="same device"):
        M.auroc(torch.from_numpy(id_s).cuda(), torch.from_numpy(ood_s))
