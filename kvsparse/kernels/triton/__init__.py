"""Triton GPU kernels. Modules here must not import torch or triton at import time (the registry
imports them without the optional extra); import them inside the functions."""
