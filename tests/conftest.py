"""Shared pytest configuration: GPU tests are skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker itself, not a keyword match: a test whose name merely contains "gpu" runs.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
