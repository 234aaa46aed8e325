"""k-nearest-neighbour OOD score (Sun et al., ICML 2022) on L2-normalised embeddings.

A baseline that ΔEnergy is usually compared with: an image is ID when its k-th nearest
neighbour among ID training embeddings (the "bank") is close. Exact search: faiss
(``IndexFlatIP``, on the GPU with faiss-gpu when the inputs are CUDA tensors) when installed,
otherwise chunked torch matmul + topk. Higher = more in-distribution, like every deltakern score.
"""

from __future__ import annotations

import importlib.util

import torch

from deltakern.core.errors import InvalidArgument
from deltakern.core.validation import check_choice, check_inputs, check_int_range

KNN_BACKENDS = ("auto", "faiss", "torch")


def _faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _kth_similarity_faiss(x: torch.Tensor, bank: torch.Tensor, k: int, batch_rows: int) -> torch.Tensor:
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(bank.shape[1])
    if x.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), x.device.index or 0, index)
    index.add(np.ascontiguousarray(bank.float().cpu().numpy()))
    out = []
    for start in range(0, x.shape[0], batch_rows):
        block = np.ascontiguousarray(x[start : start + batch_rows].float().cpu().numpy())
        sims, _ = index.search(block, k)
        out.append(torch.from_numpy(sims[:, k - 1].copy()))
    return torch.cat(out).to(x.device)


def _kth_similarity_torch(x: torch.Tensor, bank: torch.Tensor, k: int, batch_rows: int) -> torch.Tensor:
    out = []
    for start in range(0, x.shape[0], batch_rows):
        sims = x[start : start + batch_rows] @ bank.T
        out.append(sims.topk(k, dim=1).values[:, k - 1])
    return torch.cat(out)


def knn_score(
    X: torch.Tensor,
    bank: torch.Tensor,
    *,
    k: int = 50,
    backend: str = "auto",
    batch_rows: int = 16_384,
) -> torch.Tensor:
    """Negative distance from each normalised row of ``X [N, D]`` to its ``k``-th nearest
    normalised row of ``bank [M, D]`` (ID training embeddings): ``-‖x̂ − b̂_(k)‖`` per row, float32
    on X's device (float64 inputs with the torch backend stay float64).

    ``backend``: ``"faiss"`` (exact flat index), ``"torch"`` (chunked matmul + topk) or ``"auto"``
    (faiss when installed). The search holds at most ``batch_rows × M`` similarities at once.
    """
    X, bank = check_inputs(X, bank, normalize=True, names=("X", "bank"))
    k = check_int_range("k", k, 1, bank.shape[0])
    backend = check_choice("backend", backend, KNN_BACKENDS)
    batch_rows = check_int_range("batch_rows", batch_rows, 1, 2**31)
    if backend == "faiss" and not _faiss_available():
        raise InvalidArgument("backend='faiss' is not available: install faiss-cpu or faiss-gpu; available: 'torch'")
    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    acc = torch.float64 if torch.float64 in (X.dtype, bank.dtype) and not use_faiss else torch.float32
    x = X.to(acc) / torch.linalg.vector_norm(X.to(acc), dim=1, keepdim=True)
    b = bank.to(acc) / torch.linalg.vector_norm(bank.to(acc), dim=1, keepdim=True)
    search = _kth_similarity_faiss if use_faiss else _kth_similarity_torch
    kth = search(x, b, k, batch_rows).to(acc)
    # For unit vectors ‖x − b‖² = 2 − 2·cos; rounding can push it a hair below zero.
    return -torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))
