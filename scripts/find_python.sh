#!/usr/bin/env bash
# Print the absolute path of a Python >= 3.12 interpreter, or explain what to install.
# Order: $PYTHON, python3.12 / python3.13 / python3 on PATH, then pyenv-installed versions
# (through pyenv, or in $PYENV_ROOT / ~/.pyenv/versions when pyenv is not on PATH).
set -u

usable() {  # usable CMD... -> prints sys.executable if it runs and is >= 3.12
  "$@" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

if [ -n "${PYTHON:-}" ]; then
  if usable "$PYTHON"; then exit 0; fi
  echo "error: PYTHON=$PYTHON is not a working Python >= 3.12" >&2
  exit 1
fi

for cand in python3.12 python3.13 python3.14 python3; do
  if command -v "$cand" >/dev/null 2>&1 && usable "$cand"; then exit 0; fi
done

if command -v pyenv >/dev/null 2>&1; then
  for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -t. -k1,1n -k2,2n -k3,3n); do
    if PYENV_VERSION="$version" usable pyenv exec python3; then exit 0; fi
  done
fi

# pyenv installs even when pyenv itself is not on PATH (e.g. a non-interactive CI shell).
for root in "${PYENV_ROOT:-}" "$HOME/.pyenv"; do
  [ -n "$root" ] && [ -d "$root/versions" ] || continue
  for bin in $(ls -d "$root"/versions/3.*/bin/python3 2>/dev/null | sort -V); do
    if usable "$bin"; then exit 0; fi
  done
done

cat >&2 <<'MSG'
error: no Python >= 3.12 found (jax >= 0.12 needs it).
Tried: $PYTHON, python3.12, python3.13, python3.14, python3 on PATH, and pyenv versions.
Install one, e.g.:
  pyenv install 3.12            # then re-run make
  apt-get install python3.12 python3.12-venv
or point to one explicitly:  make test PYTHON=/path/to/python3.12
MSG
exit 1
