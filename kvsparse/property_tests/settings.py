"""Hypothesis profiles.

* ``ci``  — derandomized (a red run reproduces exactly), modest example counts. Chosen when the
  ``CI`` environment variable is set.
* ``dev`` — random, larger; the default for local runs.
Override with ``KVSPARSE_HYPOTHESIS_PROFILE=ci|dev``.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def register_profiles(load: bool = True) -> str:
    settings.register_profile("ci", derandomize=True, max_examples=30, **_COMMON)
    settings.register_profile("dev", max_examples=150, **_COMMON)
    name = os.environ.get("KVSPARSE_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
    if name not in ("ci", "dev"):
        raise ValueError(f"KVSPARSE_HYPOTHESIS_PROFILE must be 'ci' or 'dev', got {name!r}")
    if load:
        settings.load_profile(name)
    return name
