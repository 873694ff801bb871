"""Property suite of vAttention kernels that reproduce the oracle's draws (``rng`` consumed call for call,
see ``kernels/numba/vattention.py``): the selection and its Horvitz-Thompson weights must equal the
oracle's exactly, the output is judged by the FlashAttention rule with those weights.

There is no score band: a top-k token that a kernel ranks differently changes the residual and so
every draw after it; a kernel that computes its plan in a low precision, or draws its own sample in
its own way, is checked statistically instead (``property_tests.vattention.check_sampler``, which is
what ``kvsparse validate vattention`` runs on third-party kernels).
"""
from __future__ import annotations

from hypothesis import strategies as st

from .. import registry
from .suites import MethodSuite

# (budget_rule, targets, sampling, domain): every combination the oracle accepts with a claim
_RULES = (("clt", "output", "without_replacement", "residual"),
          ("clt", "denominator", "without_replacement", "residual"),
          ("chebyshev", "output", "without_replacement", "residual"),
          ("clt", "output", "with_replacement", "residual"),
          ("reference", "denominator", "with_replacement_dedup", "window"))


@st.composite
def _vattention_methods(draw, shapes):
    from ..oracle.vattention import VAttention
    n = max(shapes.n, 1)
    size = st.one_of(st.integers(0, n + 1), st.floats(0.0, 0.5).map(lambda f: round(f, 3)))
    rule, targets, sampling, domain = draw(st.sampled_from(_RULES))
    return VAttention(sinks=draw(size), local=draw(size), heavy=draw(size),
                      epsilon=draw(st.sampled_from([0.05, 0.2, 0.5])), delta=draw(st.sampled_from([0.05, 0.2])),
                      budget_rule=rule, targets=targets, sampling=sampling, domain=domain,
                      base_rate=draw(st.sampled_from([0.05, 0.3, 0, 3])),
                      weight_guard=1e-6 if rule == "reference" else 0.0, seed=draw(st.integers(0, 2**16)))


registry.register_suite("vattention")(MethodSuite("vattention", _vattention_methods))
