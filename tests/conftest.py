"""Shared test set-up: a persistent XLA compilation cache and helpers for subprocess runs."""

import os
import subprocess
import sys
import tempfile

# Before JAX is imported anywhere: reuse compiled programs across tests, xdist workers and
# the training subprocesses the tests start (compilation dominates these tests' time).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'laud_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra: str) -> dict[str, str]:
  """Environment for a child Python that imports this checkout."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def run_python(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
  """Runs `python ARGS` from the repository root and returns the completed process."""
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=subprocess_env(**env),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def repo_root() -> str:
  return REPO_ROOT
