"""Optimized implementations: ``numba`` (CPU) and ``triton`` (GPU; optional extra, torch imported lazily)."""
