"""pytest plugin (entry point ``pytest11: kvsparse``): ``--kvsparse-kernel METHOD=module:callable``
runs kvsparse's property suites on a user's kernel. Loaded by pytest wherever kvsparse is installed,
so it imports nothing heavy at import time."""
from __future__ import annotations


def pytest_addoption(parser):
    group = parser.getgroup("kvsparse")
    group.addoption("--kvsparse-kernel", action="append", default=[], metavar="METHOD=module:callable",
                    help="check a kernel against kvsparse's oracle for METHOD (repeatable)")
