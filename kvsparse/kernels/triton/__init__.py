"""Triton GPU kernels. Modules here must not import torch or triton at import time (the registry
imports them without the optional extra); import them inside the functions.

Without a GPU, Triton kernels can only run in Triton's interpreter: unless the user set
TRITON_INTERPRET, it is turned on here, before any kernel module imports triton (triton reads it
at import time).
"""
import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"
