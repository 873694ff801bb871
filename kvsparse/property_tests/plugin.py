"""pytest plugin (entry point ``pytest11: kvsparse``): check your own kernels with kvsparse's suites.

    pytest --kvsparse-kernel quest=mypkg.kernels:quest_decode [--kvsparse-kernel dense=...]
           [--kvsparse-examples 50] [--kvsparse-dtype float16] [--kvsparse-params quest='{"page_size": 16}']
           [--kvsparse-inputs strategies|trace|synthetic|mixed]

Each ``METHOD=module:callable`` becomes one test item, ``kvsparse[METHOD:module:callable]``, that runs
the method's property suite (``kvsparse validate`` does the same from the command line) and fails
with the minimal failing input and the property it broke. ``--kvsparse-inputs`` is ``kvsparse
validate --inputs``: where the inputs come from (default: the suites' strategies; ``trace``: the
shipped SmolLM2 trace). Loaded by pytest wherever kvsparse is installed, so nothing heavy is
imported until an option is given.
"""
from __future__ import annotations

import json

import pytest

# kept in step with kvsparse.property_tests.suites.INPUT_SOURCES (tested): importing the suites here
# would import hypothesis and numpy into every pytest run where kvsparse is installed
INPUT_SOURCES = ("strategies", "trace", "synthetic", "mixed")


def pytest_addoption(parser):
    group = parser.getgroup("kvsparse")
    group.addoption("--kvsparse-kernel", action="append", default=[], metavar="METHOD=module:callable",
                    help="check a kernel against kvsparse's oracle for METHOD (repeatable)")
    group.addoption("--kvsparse-examples", type=int, default=None, metavar="N",
                    help="hypothesis examples per kernel (default: kvsparse validate's default)")
    group.addoption("--kvsparse-dtype", default="float32", metavar="DTYPE",
                    help="dtype the kernels are called with (float16, bfloat16, float32, float64)")
    group.addoption("--kvsparse-params", action="append", default=[], metavar="METHOD=JSON",
                    help="fixed hyper-parameters for METHOD's oracle (repeatable)")
    group.addoption("--kvsparse-inputs", default="strategies", choices=INPUT_SOURCES,
                    help="where inputs come from: the suites' strategies (default), the shipped SmolLM2 trace, "
                         "synthetic traces, or a mix (as `kvsparse validate --inputs`)")


def _parse(spec: str, option: str) -> tuple[str, str]:
    if "=" not in spec:
        raise pytest.UsageError(f"{option} expects METHOD=VALUE, got {spec!r}")
    name, _, value = spec.partition("=")
    return name.strip(), value.strip()


class KernelSuiteItem(pytest.Item):
    def __init__(self, *, method: str, kernel_spec: str, params, examples, dtype, inputs="strategies", **kw):
        super().__init__(**kw)
        self.method, self.kernel_spec, self.params, self.examples, self.dtype = method, kernel_spec, params, examples, dtype
        self.inputs = inputs

    def runtest(self):
        from . import validate
        kw = {} if self.examples is None else {"examples": self.examples}
        try:
            kernel = validate.load_callable(self.kernel_spec)
            report, path = validate.validate(self.method, kernel, params=self.params, dtype=self.dtype,
                                             inputs=self.inputs, **kw)
        except (ValueError, TypeError) as exc:   # usage: unknown method, unimportable kernel, bad params
            raise KernelSuiteUsageError(f"kvsparse[{self.method}:{self.kernel_spec}]: usage error: {exc}") from exc
        if not report.ok:
            where = f"\nfailing input saved to {path}" if path else ""
            raise KernelSuiteFailure(f"{report}{where}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, (KernelSuiteFailure, KernelSuiteUsageError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"kvsparse[{self.method}:{self.kernel_spec}]"


class KernelSuiteFailure(AssertionError):
    pass


class KernelSuiteUsageError(Exception):
    """The item could not run the suite (not a bug found in the kernel): reported without a traceback."""


def pytest_collection_modifyitems(session, config, items):
    specs = config.getoption("--kvsparse-kernel")
    if not specs:
        return
    params = {}
    for spec in config.getoption("--kvsparse-params"):
        name, value = _parse(spec, "--kvsparse-params")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise pytest.UsageError(f"--kvsparse-params {name}: not JSON: {exc}") from exc
    for spec in specs:
        method, kernel_spec = _parse(spec, "--kvsparse-kernel")
        items.append(KernelSuiteItem.from_parent(
            session, name=f"kvsparse[{method}:{kernel_spec}]", method=method, kernel_spec=kernel_spec,
            params=params.get(method), examples=config.getoption("--kvsparse-examples"),
            dtype=config.getoption("--kvsparse-dtype"), inputs=config.getoption("--kvsparse-inputs")))
