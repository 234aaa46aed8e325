"""Shared pytest configuration: GPU tests are skipped on machines without CUDA."""

from __future__ import annotations

import os

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


# ---- hypothesis profiles (tests/test_properties.py) ------------------------------------------
# "fast" (the default): a few draws per property in every run. "ci": 1,000 draws per property,
# the slow run CI executes: DELTAKERN_HYPOTHESIS_PROFILE=ci, or a run selecting the slow marker
# (pytest -m slow tests/test_properties.py). No example database: runs leave no files behind
# and a CI run does not depend on an earlier one; a failure prints its reproduction blob.
HYPOTHESIS_PROFILE_ENV = "DELTAKERN_HYPOTHESIS_PROFILE"


def _register_hypothesis_profiles() -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the property tests skip themselves
        return
    common = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fast", max_examples=25, **common)
    settings.register_profile("ci", max_examples=1000, **common)
    settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "fast"))


_register_hypothesis_profiles()


def pytest_configure(config):
    markexpr = getattr(config.option, "markexpr", "") or ""
    if HYPOTHESIS_PROFILE_ENV not in os.environ and "slow" in markexpr and "not slow" not in markexpr:
        try:
            from hypothesis import settings
        except ImportError:
            return
        settings.load_profile("ci")
