"""Test-wide settings."""

import os

# Tests compile many small programs: XLA's cheaper CPU optimization halves compile time,
# and the tiny models' run time does not matter.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
