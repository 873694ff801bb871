"""Attention traces (``format``, ``synthetic``, ``capture``, ``stats``) and access traces (``access``).

``format`` and ``stats`` need NumPy only; ``capture`` needs the ``hf`` extra (torch, transformers, gguf).
"""
