"""Wall-clock timing of JAX callables, side by side: the one helper every benchmark uses.

Each callable is warmed up (compilation included), then all are run in rotating order so
that slow drift of the machine (clock, other load) touches each of them alike; every call
ends with ``jax.block_until_ready``. Reported statistics are the median, min and max.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np


def time_side_by_side(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 3,
    *,
    progress: bool = False,
    desc: str = "",
) -> dict[str, list[float]]:
    """Wall seconds of each callable: ``repeats`` rounds in rotating order after ``warmup`` calls each."""
    names = list(fns)
    for name in names:
        for _ in range(max(1, warmup)):
            jax.block_until_ready(fns[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    rounds: Any = range(max(1, repeats))
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc=desc, leave=False, file=sys.stderr)
    for r in rounds:
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return times


def stats_ms(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of wall seconds, in milliseconds."""
    ms = 1e3 * np.asarray(times, dtype=np.float64)
    return {"median_ms": float(np.median(ms)), "min_ms": float(ms.min()), "max_ms": float(ms.max())}
