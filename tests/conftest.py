import os

from kvsparse.property_tests.settings import register_profiles

register_profiles()

# Triton reads TRITON_INTERPRET when it is imported: decide before any test module imports it.
# Without a GPU, Triton kernels run in the interpreter on the CPU.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
