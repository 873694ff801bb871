"""kvsparse: ground truth for sparse attention and KV-cache compression in LLM decoding.

Subpackages: ``oracle`` (exact float64 references), ``kernels`` (Numba / Triton), ``sim``
(memory-traffic and latency simulator), ``traces`` (attention and access traces),
``property_tests`` (hypothesis strategies and suites). ``registry`` maps method names to all four.
"""
__version__ = "0.1.0"
