"""Test-wide settings and helpers for tests that start subprocesses."""

import os
import subprocess
import sys
import tempfile

# Tests compile many small programs: XLA's cheaper CPU optimization halves compile time,
# and the tiny models' run time does not matter.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
# Reuse compiled programs across tests, xdist workers and the training subprocesses the
# tests start (set before JAX is imported anywhere).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "laud_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a child Python that imports this checkout; XLA_FLAGS are appended."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if "XLA_FLAGS" in extra:
        extra["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + extra["XLA_FLAGS"]).strip()
    env.update(extra)
    return env


def run_python(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Runs `python ARGS` from the repository root and returns the completed process."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
