"""Memory-traffic and latency simulator of decode steps (pure NumPy; see docs/sim.md).

    from kvsparse.sim import latency, sweep
    t = latency.simulate("llama-3-8b", "h100-sxm", "quest", 2048, [32768])
    t.step_seconds, latency.kernel_table(t)

Submodules: ``hardware`` (GPU catalog), ``models`` (model shapes), ``costmodel`` (the cost-model
contract), ``costs`` (one cost model per method), ``latency`` (time), ``sweep`` (budget modeling).
"""
