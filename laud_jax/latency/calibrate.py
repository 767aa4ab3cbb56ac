"""Calibration: fit the local profile's free parameters to measured per-block times.

``fit_profile`` fits in log space (least squares on log(predicted / measured), so every
configuration counts by its relative error; trust-region least squares over log or logit
parameters);
``calibrate_local`` times the sparse engine's blocks on this machine (see
``laud_jax.latency.timing``), fits on a training split and reports predicted vs measured
on the held-out split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from laud_jax.latency.launches import ENGINES, BlockSetting, BlockShape, EngineModel
from laud_jax.latency.predictor import block_time
from laud_jax.latency.profiles import LOCAL_INITIAL, HardwareProfile, profile_to_json

# Free parameters of the local (CPU) fit and how they are kept in range.
FIT_FIELDS = (
    "flops_fp32",
    "eff_conv",
    "eff_grouped",
    "dram_bw",
    "l2_bw",
    "gather_eff",
    "launch_overhead",
    "loop_overhead",
    "call_overhead",
    "k_half",
    "sum_weight",
)
# Timed repeats per configuration (the minimum is kept). On a shared 2-core VM the minimum of
# 9 repeats was 1.27x the minimum of 40 (median over 160 configurations, 2026-12-02): more
# repeats cost little next to compiling each configuration.
DEFAULT_REPEATS = 40
UNIT_FIELDS = ("eff_conv", "eff_grouped", "gather_eff", "sum_weight")  # in [0, 1] (logistic); the others positive (log)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Measurements:
    """Measured configurations: block shapes and settings (leading axis n) and seconds (n,).

    Every measurement is one jitted call of one block (one host call overhead each).
    """

    shapes: BlockShape
    settings: BlockSetting
    seconds: Any

    def __len__(self) -> int:
        return int(np.asarray(self.seconds).shape[0])

    def take(self, index: np.ndarray) -> Measurements:
        return jax.tree.map(lambda x: jnp.asarray(x)[np.asarray(index)], self)


def _timed_engine(engine: EngineModel) -> EngineModel:
    """A timed block call pays one host call whatever its mode (counted separately)."""
    return engine.replace(block_calls=0.0)


@jax.jit
def predict_measured(profile: HardwareProfile, engine: EngineModel, shapes: BlockShape, settings: BlockSetting):
    """Predicted seconds of each measured block call."""
    engine = _timed_engine(engine)
    times = jax.vmap(lambda shape, setting: block_time(profile, engine, shape, setting))(shapes, settings)
    return times + profile.call_overhead


def _encode(profile: HardwareProfile, fields: Sequence[str]) -> np.ndarray:
    values = []
    for field in fields:
        v = float(getattr(profile, field))
        if field in UNIT_FIELDS:
            v = min(max(v, 1e-4), 1 - 1e-4)
            values.append(np.log(v / (1 - v)))
        else:
            values.append(np.log(max(v, 1e-12)))
    return np.asarray(values, np.float64)


def _decode(theta, base: HardwareProfile, fields: Sequence[str]) -> HardwareProfile:
    changes = {}
    for i, field in enumerate(fields):
        changes[field] = jax.nn.sigmoid(theta[i]) if field in UNIT_FIELDS else jnp.exp(theta[i])
    return dataclasses.replace(base.as_arrays(), **changes)


def fit_profile(
    data: Measurements,
    engine: EngineModel,
    initial: HardwareProfile = LOCAL_INITIAL,
    fields: Sequence[str] = FIT_FIELDS,
    max_evaluations: int = 200,
) -> tuple[HardwareProfile, dict[str, Any]]:
    """Fit ``fields`` of ``initial`` to ``data``; returns (profile, fit summary)."""
    unknown = sorted(set(fields) - set(FIT_FIELDS))
    if unknown:
        raise ValueError(f"cannot fit {unknown}; fittable fields are {FIT_FIELDS}")
    if len(data) < len(fields):
        raise ValueError(f"{len(data)} measurements cannot determine {len(fields)} parameters")
    if np.any(np.asarray(data.seconds) <= 0):
        raise ValueError("measured times must be positive")
    engine_arrays = engine.as_arrays()
    log_measured = np.log(np.asarray(data.seconds, np.float64))

    def residuals(theta: np.ndarray) -> np.ndarray:
        profile = _decode(jnp.asarray(theta, jnp.float32), initial, fields)
        predicted = predict_measured(profile, engine_arrays, data.shapes, data.settings)
        return np.log(np.asarray(predicted, np.float64)) - log_measured

    import scipy.optimize  # only the fit needs it (0.4 s to import): not every latency command

    start = time.perf_counter()
    # Finite differences: the model is piecewise smooth (waves, capacities, max), and each
    # evaluation is one call of the compiled predictor.
    result = scipy.optimize.least_squares(
        residuals,
        _encode(initial, fields),
        jac="3-point",
        diff_step=1e-3,
        method="trf",
        max_nfev=max_evaluations,
    )
    profile = jax.tree.map(lambda x: np.asarray(x, np.float64), _decode(jnp.asarray(result.x), initial, fields))
    profile = dataclasses.replace(profile, dense_tiles=initial.dense_tiles)
    summary = {
        "fields": list(fields),
        "cost": float(result.cost),
        "evaluations": int(result.nfev),
        "status": result.message,
        "seconds": time.perf_counter() - start,
    }
    return profile, summary


def relative_errors(profile: HardwareProfile, engine: EngineModel, data: Measurements) -> np.ndarray:
    """predicted / measured - 1 for every measurement."""
    predicted = predict_measured(profile.as_arrays(), engine.as_arrays(), data.shapes, data.settings)
    return np.asarray(predicted, np.float64) / np.asarray(data.seconds, np.float64) - 1.0


def error_summary(errors: np.ndarray) -> dict[str, float]:
    magnitude = np.abs(errors)
    return {
        "count": int(errors.size),
        "median_abs_rel_error": float(np.median(magnitude)),
        "mean_abs_rel_error": float(np.mean(magnitude)),
        "within_20pct": float(np.mean(magnitude <= 0.2)),
        "max_abs_rel_error": float(np.max(magnitude)),
    }


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, held-out) index split."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, int(round(holdout * n)))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def calibrate_local(
    *,
    out: str,
    measurements: str | None,
    configs: int,
    repeats: int,
    holdout: float,
    seed: int,
    backend: str = "xla",
) -> dict[str, Any]:
    """Time (or reload) per-block measurements, fit the local profile, save it, report errors."""
    from laud_jax.latency import timing  # the sparse engine and the models: only needed here

    if measurements and os.path.exists(measurements):
        records = timing.load_measurements(measurements)
        print(f"reusing {len(records)} timings from {measurements}")
    else:
        records = timing.measure(timing.sample_configs(configs, seed), repeats=repeats, backend=backend)
        if measurements:
            timing.save_measurements(measurements, records)
            print(f"wrote {measurements}")
    data = timing.to_measurements(records)
    engine = ENGINES["xla"]
    train, held = split(len(data), holdout, seed)
    profile, summary = fit_profile(data.take(train), engine)
    train_errors = relative_errors(profile, engine, data.take(train))
    held_errors = relative_errors(profile, engine, data.take(held))
    report = {
        "fit": summary,
        "profile": profile.to_dict(),
        "train": error_summary(train_errors),
        "held_out": error_summary(held_errors),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "device": str(jax.devices()[0]),
        },
        "configurations": [
            {
                **record,
                "predicted_s": float(record["seconds"] * (1.0 + err)),
                "rel_error": float(err),
                "held_out": bool(i in set(held.tolist())),
            }
            for i, (record, err) in enumerate(zip(records, relative_errors(profile, engine, data)))
        ],
    }
    profile_to_json(profile, out, name="local", meta={k: report[k] for k in ("fit", "train", "held_out", "machine")})
    print(f"wrote {out}")
    held_summary = report["held_out"]
    print(
        f"held-out blocks: median |rel. error| {100 * held_summary['median_abs_rel_error']:.1f}%, "
        f"{100 * held_summary['within_20pct']:.0f}% within +-20% ({held_summary['count']} configurations; "
        f"train median {100 * report['train']['median_abs_rel_error']:.1f}%)"
    )
    print("fitted: " + ", ".join(f"{k}={float(getattr(profile, k)):.4g}" for k in FIT_FIELDS))
    return report


def write_report(path: str, report: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
