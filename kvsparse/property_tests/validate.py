"""``kvsparse validate``: run a method's property suite on anyone's kernel and give a verdict.

The contract a third-party kernel must meet is the kernel-step contract of ``suites.py``:

    kernel(method, q, k, v, *, positions=None, scale=None) -> output | (output, indices) | (output, indices, weights)

with NumPy arrays in the kernel's dtype (torch tensors returned are converted at the boundary);
stateful methods add ``kernel.prefill(method, q_prompt, k_prompt, v_prompt, *, scale=None) -> state``
and ``kernel.decode(method, state, q, k_new, v_new, *, scale=None) -> (state, step)``, one softmax
scale for the whole sequence (a ``prefill`` without ``scale``, the older contract, is called without
it: ``suites.prefill_takes_scale``).

``--inputs`` picks where inputs come from (``suites.INPUT_SOURCES``): the suites' strategies
(default), the shipped SmolLM2 trace (or ``--trace FILE``), seeded synthetic traces, or a mix; for a
stateful method a trace input is a prefix of one layer's Q/K/V decoded token by token.

Randomized kernels (method ``vattention``) also take ``rng=`` (a ``numpy.random.Generator``) and
return ``(output, indices, weights)``; they are checked statistically (``validate_sampler``,
``property_tests.vattention.check_sampler``): ``--calls`` independent calls per input, exact
binomial test of the claimed failure probability at the stated false alarm ``--alpha``.

Structural methods (``suites_structural.py``) also check optional kernel attributes beside the step
(``EXTENDED_CONTRACTS``): CLA's ``decode_layers`` (every layer over its producer's cache) and LoRC's
``decode_latent`` (the decode from the cache's latents); a failure there is saved as the step's input,
from which the suite derives them again on ``--replay``.

Stateful methods without a registered suite, or whose oracle needs a longer prompt than the suite
draws (kvpress presets: ``T > window``), are checked on ``fitted_sequences`` (exact selection when
the method has no score band). A kernel may name the preset it implements (``kernel.kvsparse_preset``,
as the kvpress adapters do): it is used when no ``--preset`` is given (``--params`` then override its fields).

On a failure, the smallest failing input hypothesis found is saved (``.npz``: the exact arrays the
kernel was called with, the softmax scale, the method's hyper-parameters, nested methods as
``{"class", "method", "params"}``, and the dtype) and can be re-run with ``--replay FILE`` for the
method it was saved for. Exit status: 0 pass, 1 a bug was found, 2 usage error (including a kernel
module that cannot be imported: a syntax error, or an exception raised at import).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, given, seed as hyp_seed, settings as hyp_settings, strategies as st

from .. import registry
from ..oracle import core
from . import suites
from .strategies import DecodeInput

DEFAULT_EXAMPLES = 50


def load_callable(spec: str) -> Callable:
    """``package.module:attr`` or ``path/to/file.py:attr`` -> the object (``attr`` may be dotted)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"kernel must be given as module:callable or file.py:callable, got {spec!r}")
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"kernel file {mod_name!r} does not exist")
        spec_ = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec_)
        previous = sys.modules.get(path.stem)
        sys.modules[path.stem] = module
        try:
            spec_.loader.exec_module(module)
        except Exception as exc:    # a syntax error or a raise at import: the user's file, not a bug found
            if previous is None:
                sys.modules.pop(path.stem, None)
            else:
                sys.modules[path.stem] = previous
            raise ValueError(f"cannot import kernel file {mod_name!r}: {_import_failure(exc)}") from exc
    else:
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            raise ValueError(f"cannot import kernel module {mod_name!r}: {_import_failure(exc)}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj


def _import_failure(exc: BaseException) -> str:
    """``SyntaxError: invalid syntax (file.py, line 3)`` or ``RuntimeError: boom (raised at file.py, line 7)``."""
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.msg}{where}"
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "importlib" not in f.filename and "<frozen" not in f.filename]
    where = f" (raised at {user[-1].filename}, line {user[-1].lineno})" if user else ""
    return f"{type(exc).__name__}: {exc}{where}"


def fixed_method(name: str, preset: str = "canonical", params: dict | None = None):
    """The method's oracle in a preset with some hyper-parameters overridden (``params``)."""
    method = registry.oracle(name, preset)
    if params:
        fields = {f.name for f in dataclasses.fields(method)}
        unknown = sorted(set(params) - fields)
        if unknown:
            raise ValueError(f"params {unknown} are not hyper-parameters of {name!r}; it has {sorted(fields)}")
        method = dataclasses.replace(method, **params)
    return method


class Recorder:
    """Wraps a kernel and remembers the arguments of its most recent input (hypothesis re-runs the
    minimal failing example last, so after a failure this holds exactly that input)."""

    def __init__(self, kernel: Callable):
        self.kernel = kernel
        self.last: dict[str, Any] = {}
        self.__qualname__ = getattr(kernel, "__qualname__", type(kernel).__name__)
        self.__module__ = getattr(kernel, "__module__", "")
        if hasattr(kernel, "prefill"):
            # the same prefill signature as the kernel's (with or without scale): suites.prefill_takes_scale
            self.prefill = self._prefill if suites.prefill_takes_scale(kernel) else self._prefill_without_scale
            self.decode = self._decode
        for extended in EXTENDED_CONTRACTS:
            # called by a structural suite on inputs it derives from the recorded step (the step's
            # arrays replay them): passed through, not recorded
            if hasattr(kernel, extended):
                setattr(self, extended, getattr(kernel, extended))

    def __call__(self, method, q, k, v, **kw):
        self.last = {"kind": "step", "method": method, "q": q, "k": k, "v": v, "scale": kw.get("scale")}
        return self.kernel(method, q, k, v, **kw)

    def _prefill(self, method, q, k, v, **kw):
        self.last = {"kind": "decode", "method": method, "q": [q], "k": [k], "v": [v], "prefill_len": q.shape[0],
                     "scale": kw.get("scale")}
        return self.kernel.prefill(method, q, k, v, **kw)

    def _prefill_without_scale(self, method, q, k, v):
        return self._prefill(method, q, k, v)

    def _decode(self, method, state, q, k_new, v_new, **kw):
        for key, x in (("q", q), ("k", k_new), ("v", v_new)):
            self.last[key].append(x[None])
        self.last["scale"] = kw.get("scale")
        return self.kernel.decode(method, state, q, k_new, v_new, **kw)


def method_params(method) -> dict:
    """A method's hyper-parameters as JSON-ready values (``params_from_json`` inverts it exactly).

    A nested Method (Twilight's ``base``) is ``{"class", "method", "params"}``; tuples are lists;
    NumPy arrays are ``{"ndarray", "dtype"}``; Fractions ``{"fraction": "p/q"}``.
    """
    return {f.name: _encode_param(getattr(method, f.name)) for f in dataclasses.fields(method) if f.init}


def _encode_param(val):
    from ..oracle.method import Method
    if isinstance(val, Method):
        return {"class": type(val).__name__, "method": val.name, "params": method_params(val)}
    if isinstance(val, np.ndarray):
        return {"ndarray": val.tolist(), "dtype": str(val.dtype)}
    if isinstance(val, (tuple, list)):
        return [_encode_param(x) for x in val]
    if isinstance(val, Fraction):
        return {"fraction": str(val)}
    if isinstance(val, np.generic):
        return val.item()
    return val


def params_from_json(params: dict, where: str = "params") -> dict:
    """Inverse of ``method_params``: lists back to tuples, nested methods rebuilt from their registry class."""
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be a JSON object of hyper-parameters, got {type(params).__name__}")
    return {key: _decode_param(val, f"{where}.{key}") for key, val in params.items()}


def _decode_param(val, where: str):
    if isinstance(val, list):
        return tuple(_decode_param(x, f"{where}[{i}]") for i, x in enumerate(val))
    if isinstance(val, dict):
        if set(val) == {"class", "method", "params"}:
            entry = registry.get(val["method"])
            cls = entry.oracle
            if cls is None or cls.__name__ != val["class"]:
                raise ValueError(f"{where}: method {val['method']!r} has oracle class "
                                 f"{getattr(cls, '__name__', None)!r}, not {val['class']!r}")
            return cls(**params_from_json(val["params"], f"{where}.params"))
        if set(val) == {"ndarray", "dtype"}:
            return np.asarray(val["ndarray"], dtype=val["dtype"])
        if set(val) == {"fraction"}:
            return Fraction(val["fraction"])
        raise ValueError(f"{where}: unrecognised encoded value {val!r}")
    return val


def save_failure(path, name: str, dtype: str, recorder: Recorder, verdict, extra: dict | None = None) -> Path:
    """Write the failing input (exact kernel arguments) and everything needed to re-run it."""
    last = recorder.last
    arrays = {key: (np.concatenate(last[key]) if last["kind"] == "decode" else last[key]) for key in ("q", "k", "v")}
    meta = {"method": name, "class": type(last["method"]).__name__, "params": method_params(last["method"]),
            "dtype": dtype, "kind": last["kind"], "prefill_len": last.get("prefill_len"), "scale": last.get("scale"),
            "verdict": str(verdict), **(extra or {})}
    path = Path(path)
    with open(path, "wb") as fh:
        np.savez(fh, meta=np.frombuffer(json.dumps(meta, default=str).encode(), np.uint8),
                 **{key: np.asarray(a, dtype=np.float64) for key, a in arrays.items()})
    return path


def load_failure(path):
    """``(meta, q, k, v)`` of a saved failure file, or ``ValueError``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            q, k, v = z["q"], z["k"], z["v"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ValueError(f"{path}: not a kvsparse failure file ({exc})") from exc
    if not isinstance(meta, dict) or not {"method", "params", "dtype", "kind"} <= set(meta):
        raise ValueError(f"{path}: not a kvsparse failure file (metadata lacks method/params/dtype/kind)")
    return meta, q, k, v


def saved_method(meta: dict, where: str = "failure file"):
    """The exact method instance a failure file was saved with (nested methods rebuilt)."""
    name = meta["method"]
    cls = type(registry.oracle(name))
    if meta.get("class", cls.__name__) != cls.__name__:
        raise ValueError(f"{where}: saved class {meta['class']!r} is not {name!r}'s oracle {cls.__name__}")
    params = meta["params"]
    for key, val in params.items():
        default = getattr(registry.oracle(name), key, None)
        if isinstance(val, str) and hasattr(default, "select"):
            raise ValueError(f"{where}: the nested method {key!r} was saved as text ({val[:60]!r}...) by an older "
                             "kvsparse and cannot be rebuilt; re-run the search to save it again")
    return fixed_method(name, params=params_from_json(params, f"{where} params"))


def replay(path, kernel: Callable, method_name: str | None = None):
    """Re-run a saved failing input on ``kernel``; returns the Verdict (or the list for a decode).

    ``method_name`` (the command line's METHOD) must be the method the file was saved for.
    """
    meta, q, k, v = load_failure(path)
    if method_name is not None and method_name != meta["method"]:
        raise ValueError(f"{path} is a failing input of method {meta['method']!r}, not {method_name!r}: "
                         f"re-run it with `kvsparse validate {meta['method']} ... --replay {path}`")
    method = saved_method(meta, str(path))
    if meta["method"] == SAMPLER_METHOD:
        from . import vattention as va
        return va.check_sampler(method, kernel, q, k, v, calls=meta["calls"], alpha=meta["alpha"],
                                seed=meta["rng_seed"], dtype=meta["dtype"])
    suite = registry.get(meta["method"]).suite
    scores = getattr(suite, "scores", None)   # none: generic stateful check
    scale = meta.get("scale")     # the softmax scale the kernel was called with (None: 1/sqrt(d))
    if meta["kind"] == "decode":
        return suites.check_decode(method, kernel, q, k, v, prefill_len=meta["prefill_len"], dtype=meta["dtype"],
                                   scale=scale, scores=scores)
    check = getattr(suite, "check", None) or suites.check_step      # a structural suite's own check
    return check(method, kernel, DecodeInput(q, k, v, "replay", 0), dtype=meta["dtype"], scale=scale, scores=scores)


SAMPLER_METHOD = "vattention"        # randomized: checked statistically (validate_sampler)
EXTENDED_CONTRACTS = ("decode_layers", "decode_latent")
"""Optional kernel attributes the structural suites check beside the step (``suites_structural``):
CLA's ``decode_layers`` (every layer over its producer's cache), LoRC's ``decode_latent`` (from the latents)."""
DEFAULT_CALLS = 200
DEFAULT_ALPHA = 1e-4
# exact selection (no score band) cannot forgive float32 rounding of deliberate near-ties or of
# probabilities that underflow: the generic stateful check draws from the other families
GENERIC_FAMILIES = ("gaussian", "outlier_channels", "heavy_tails", "sink_and_local")


def min_prompt_len(method, *, limit: int = 1024) -> int:
    """Shortest prompt ``method.prefill`` accepts (a kvpress preset needs ``T > window``)."""
    rng = np.random.default_rng(0)
    for t in range(1, limit + 1):
        q, k, v = (rng.standard_normal((t, h, 4)) for h in (2, 1, 1))
        try:
            method.prefill(q, k, v)
            return t
        except ValueError:
            continue
    raise ValueError(f"{method!r} accepts no prompt of up to {limit} tokens")


@st.composite
def fitted_sequences(draw, min_prompt: int, *, max_extra_prompt: int = 16, max_steps: int = 6,
                     families=GENERIC_FAMILIES, max_h_kv: int = 2, max_group: int = 3, head_dims=(4, 8, 16)):
    """``(q_seq, k_seq, v_seq, prefill_len)`` with ``prefill_len >= min_prompt`` and 1..max_steps decode steps."""
    from .strategies import make_decode_input
    h_kv, g = draw(st.integers(1, max_h_kv)), draw(st.integers(1, max_group))
    prefill = draw(st.integers(min_prompt, min_prompt + max_extra_prompt))
    t = prefill + draw(st.integers(1, max_steps))
    d = draw(st.sampled_from(head_dims))
    inp = make_decode_input(h_kv * g, h_kv, t, d, draw(st.sampled_from(families)), draw(st.integers(0, 2**32 - 1)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q_seq = rng.standard_normal((t, h_kv * g, d)) + inp.q[None]
    return q_seq, inp.k.transpose(1, 0, 2), inp.v.transpose(1, 0, 2), prefill


def suite_for_fixed(name: str, method):
    """The suite that checks kernels of one fixed ``method`` (registered, or the generic stateful one)."""
    try:
        suite = suites.suite_for(name)
    except ValueError:
        from ..oracle.method import StatefulMethod
        if not isinstance(method, StatefulMethod):
            raise
        suite = suites.MethodSuite(name, methods=None)
    suite = dataclasses.replace(suite, methods=lambda shapes, m=method: st.just(m))
    if hasattr(method, "prefill") and hasattr(method, "decode"):
        need = min_prompt_len(method)
        if suite.sequences is None or need > 1:
            suite = dataclasses.replace(suite, sequences=fitted_sequences(need),
                                        min_prompt=max(suite.min_prompt, need))
    return suite


def _settings(examples: int, seed):
    return hyp_settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=False)


def validate(name: str, kernel: Callable, *, params: dict | None = None, preset: str | None = None,
             examples: int = DEFAULT_EXAMPLES, seed: int | None = None, dtype: str = "float32",
             save: str | Path | None = None, calls: int = DEFAULT_CALLS, alpha: float = DEFAULT_ALPHA,
             inputs: str = "strategies", trace: str | Path | None = None, max_n: int | None = None):
    """Run ``name``'s suite on ``kernel``. Returns ``(report, saved_path_or_None)``.

    ``inputs``, ``trace``, ``max_n``: where the inputs come from (``suites.suite_inputs``).
    """
    examples = core.check_positive_int(examples, "examples")
    if inputs not in suites.INPUT_SOURCES:
        raise ValueError(f"inputs must be one of {suites.INPUT_SOURCES}, got {inputs!r}")
    if preset is None:
        preset = getattr(kernel, "kvsparse_preset", None)
    if name == SAMPLER_METHOD:
        if inputs != "strategies" or trace is not None:
            raise ValueError(f"inputs must be 'strategies' for {SAMPLER_METHOD!r}: its statistical check draws "
                             "planted-logit inputs whose failure rates are known, which traces are not")
        return validate_sampler(kernel, params=params, preset=preset, examples=examples, seed=seed, dtype=dtype,
                                save=save, calls=calls, alpha=alpha)
    registry.get(name)                     # unknown method: ValueError (usage error)
    if params or preset:
        suite = suite_for_fixed(name, fixed_method(name, preset or "canonical", params))
    else:
        suite = suites.suite_for(name)
    recorder = Recorder(kernel)
    report = suites.run_suite(suite, recorder, dtype=dtype, settings=_settings(examples, seed), seed=seed,
                              inputs=inputs, trace=trace, max_n=max_n)
    if registry.get(name).suite is None:
        report.notes.append("no registered suite for this method: generic stateful check, exact selection, "
                            f"input families {GENERIC_FAMILIES}")
    path = None
    if not report.ok and recorder.last:
        path = save_failure(save or f"kvsparse-failure-{name}.npz", name, dtype, recorder, report.failure)
    return report, path


def validate_sampler(kernel: Callable, *, params: dict | None = None, preset: str | None = None,
                     examples: int = DEFAULT_EXAMPLES, seed: int | None = None, dtype: str = "float32",
                     save: str | Path | None = None, calls: int = DEFAULT_CALLS, alpha: float = DEFAULT_ALPHA):
    """vAttention kernels: ``calls`` independent calls per drawn input, statistical verdict per input.

    Inputs and (sinks, local, heavy, epsilon, delta) are drawn by ``vattention.cases`` (planted-logit
    families, n <= 300); ``params`` override drawn fields. The false alarm of the whole run is at most
    ``alpha``: each of the ``examples`` inputs is tested at ``alpha / examples`` (hypothesis runs at
    most ``examples`` inputs unless a failure is found, after which shrinking only re-confirms it).
    """
    from . import vattention as va
    from .strategies import DecodeInput
    calls = core.check_positive_int(calls, "calls")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    base = fixed_method(SAMPLER_METHOD, preset or "canonical")
    fixed_method(SAMPLER_METHOD, params=params)       # unknown fields: ValueError now, not mid-search
    recorder = Recorder(kernel)
    name = getattr(kernel, "__qualname__", type(kernel).__name__)
    report = suites.SuiteReport(SAMPLER_METHOD, f"{getattr(kernel, '__module__', '')}.{name}", dtype)
    report.notes.append(f"statistical: {calls} calls per input, false alarm <= {alpha:g} for the whole run")
    last: list = []

    @given(va.cases(families=tuple(f for f in va.FAMILIES if f != "large_ns"), max_n=300))
    def prop(case):
        method = dataclasses.replace(base, sinks=case.sinks, local=case.local, heavy=case.heavy,
                                     epsilon=case.epsilon, delta=case.delta, **(params or {}))
        q, k, v = case.inputs()
        report.examples += 1
        verdict = va.check_sampler(method, recorder, q, k, v, calls=calls, alpha=alpha / examples,
                                   seed=case.seed % 2**32, dtype=dtype,
                                   label=repr(DecodeInput(q, k, v, case.family, case.seed)))
        last.append((verdict, case.seed % 2**32))
        assert verdict.ok, str(verdict)

    if seed is not None:
        prop = hyp_seed(seed)(prop)
    try:
        _settings(examples, seed)(prop)()
    except AssertionError:
        report.failure, rng_seed = next(((v, sd) for v, sd in reversed(last) if not v.ok), (None, None))
        if report.failure is None:
            raise
    path = None
    if not report.ok and recorder.last:
        path = save_failure(save or f"kvsparse-failure-{SAMPLER_METHOD}.npz", SAMPLER_METHOD, dtype, recorder,
                            report.failure, {"calls": calls, "alpha": alpha / examples, "rng_seed": rng_seed})
    return report, path


def cmd_validate(args) -> int:
    try:
        kernel = load_callable(args.kernel)
        params = json.loads(args.params) if args.params else None
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"--params must be a JSON object, got {args.params!r}")
        if args.replay:
            if params is not None or args.preset is not None:
                raise ValueError("--params and --preset cannot be combined with --replay: the failure file "
                                 "stores the hyper-parameters it was found with")
            if args.inputs != "strategies" or args.trace is not None:
                raise ValueError("--inputs and --trace cannot be combined with --replay: the failure file "
                                 "stores the exact input it was found on")
            verdict = replay(args.replay, kernel, args.method)
            verdicts = verdict if isinstance(verdict, list) else [verdict]
            bad = next((v for v in verdicts if not v.ok), None)
            print(bad if bad else verdicts[-1])
            return 1 if bad else 0
        t0 = time.perf_counter()
        if args.trace is not None and not Path(args.trace).is_file():
            raise ValueError(f"--trace {args.trace!r}: no such file")
        report, path = validate(args.method, kernel, params=params, preset=args.preset, examples=args.examples,
                                seed=args.seed, dtype=args.dtype, save=args.save, calls=args.calls,
                                alpha=args.alpha, inputs=args.inputs, trace=args.trace)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        print(f"kvsparse validate: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    print(f"({time.perf_counter() - t0:.1f} s)")
    if report.ok:
        print("PASS")
        return 0
    broken = ", ".join(sorted({r.name for r in report.failure.failures}))
    print(f"FAIL: property broken: {broken}")
    if path:
        print(f"failing input saved to {path}; re-run it with:\n  kvsparse validate {args.method} {args.kernel} --replay {path}")
    return 1


def register(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a kernel (module:callable) against a method's oracle")
    p.add_argument("method", help="registered method name (see `kvsparse methods`)")
    p.add_argument("kernel", help="module:callable or path/to/file.py:callable")
    p.add_argument("--params", default=None, help='JSON object of fixed hyper-parameters, e.g. \'{"token_budget": 64}\'')
    p.add_argument("--preset", default=None, help="oracle preset to compare against (default: hyper-parameters drawn)")
    p.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized, reproducible)")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    p.add_argument("--save", default=None, help="where to save a failing input (default kvsparse-failure-METHOD.npz)")
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS,
                   help="randomized methods (vattention): independent calls per input")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="randomized methods: false-alarm probability of the whole run")
    p.add_argument("--inputs", default="strategies", choices=list(suites.INPUT_SOURCES),
                   help="where inputs come from: the suites' strategies (default), the shipped SmolLM2 trace "
                        "(stateful methods: prefixes of a layer decoded token by token), synthetic traces, or a mix")
    p.add_argument("--trace", default=None, help="an attention trace file for --inputs trace|mixed "
                                                 "(default: the shipped SmolLM2 trace)")
    p.add_argument("--replay", default=None, help="re-run a saved failing input instead of searching")
    p.set_defaults(func=cmd_validate)
