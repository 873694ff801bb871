"""Exact float64 reference implementations (oracles) of every method, and the attention core."""
from . import core
from .method import DecodeRun, Method, StatefulMethod, run_decode
from .types import Layout, Selection, StepResult, Traffic, kv_traffic

__all__ = ["core", "Method", "StatefulMethod", "DecodeRun", "run_decode", "Layout", "Selection",
           "StepResult", "Traffic", "kv_traffic"]
