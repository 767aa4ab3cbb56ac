"""Hardware profiles: pytrees of numbers the roofline predictor reads.

A profile holds peak throughputs, bandwidths, the core count and the fudge factors of the
roofline (efficiencies, launch overhead, max/sum combination). Every field is a float (or a
float array), so a profile can be passed through ``jax.jit``, ``jax.vmap`` and gradients.

Presets use datasheet peaks; the efficiency factors and the L2 bandwidths are
microbenchmark-level estimates (documented per preset in ``PRESET_NOTES``). ``local`` is
fitted on the machine it runs on by ``python -m laud_jax.latency calibrate``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROFILE_FORMAT = "laud_jax.latency.profile/v1"
# A fitted local profile is looked up here when `--hardware local` is asked for.
LOCAL_PROFILE_ENV = "LAUD_JAX_LOCAL_PROFILE"
DEFAULT_LOCAL_PROFILE = os.path.join("runs", "latency", "local_profile.json")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HardwareProfile:
    """Roofline parameters of one device (all SI units: FLOP/s, bytes/s, bytes, seconds).

    flops_fp32: matmul/conv FLOP/s for float32 operands (TF32 tensor cores on Ampere and
      Hopper, where XLA uses them by default; SIMT FP32 elsewhere).
    flops_half: dense bf16/fp16 tensor-unit FLOP/s (fp16 on V100, FP16 SIMT on TX2).
    dram_bw, l2_bw: DRAM and last-level-cache bandwidth; l2_size: last-level cache bytes.
    cores: SMs (GPU) or CPU cores; tiles_per_core: tiles resident per core at once
      (wave quantization is over cores * tiles_per_core slots).
    launch_overhead: seconds per kernel launch (GPU) or per XLA op (CPU).
    loop_overhead: seconds per step of an on-device loop (a scatter loop's iteration).
    call_overhead: seconds per jitted call (host dispatch), once per network or block call.
    eff_dense: fraction of peak FLOP/s that dense GEMMs reach (cuBLAS / cuDNN / XLA dots).
    eff_conv: the same for direct convolutions (cuDNN; XLA:CPU's convolution).
    eff_grouped: the same for grouped convolutions (RegNetY's conv2).
    eff_sparse: fraction of peak that gathered-tile kernels reach (indirect addressing).
    mem_eff: fraction of DRAM bandwidth that streaming kernels reach.
    gather_eff: fraction of that bandwidth that gathers and scatters of rows reach.
    sector_bytes: DRAM access granularity; gathers of shorter runs waste the rest.
    k_half: reduction length at which matmul efficiency halves (0: no penalty).
    sum_weight: 0 combines compute and memory time by max (full overlap), 1 by sum.
    dense_tiles: (n, 2) candidate (tile_m, tile_n) of dense convs; the fastest is used
      (library heuristics pick a tile per shape).
    """

    flops_fp32: Any
    flops_half: Any
    dram_bw: Any
    l2_bw: Any
    l2_size: Any
    cores: Any
    tiles_per_core: Any
    launch_overhead: Any
    loop_overhead: Any
    call_overhead: Any
    eff_dense: Any
    eff_conv: Any
    eff_grouped: Any
    eff_sparse: Any
    mem_eff: Any
    gather_eff: Any
    sector_bytes: Any
    k_half: Any
    sum_weight: Any
    dense_tiles: Any

    def replace(self, **changes: Any) -> HardwareProfile:
        return dataclasses.replace(self, **changes)

    def as_arrays(self) -> HardwareProfile:
        """Every field as a float32 array (what the jitted predictor receives)."""
        return HardwareProfile(
            **{f.name: jnp.asarray(getattr(self, f.name), jnp.float32) for f in dataclasses.fields(self)}
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: np.asarray(getattr(self, f.name), np.float64).tolist() for f in dataclasses.fields(self)}


PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(HardwareProfile))
# Candidate tiles of dense library kernels (the same set everywhere: one compiled predictor).
DENSE_TILES = ((128.0, 128.0), (128.0, 64.0), (64.0, 64.0), (32.0, 64.0), (16.0, 64.0))


def _gpu(**values: float) -> HardwareProfile:
    values.setdefault("eff_conv", values["eff_dense"])  # cuDNN: GEMM-class efficiency
    values.setdefault("eff_grouped", 0.3 * values["eff_dense"])  # narrow groups starve the MMA units
    values.setdefault("loop_overhead", values["launch_overhead"])
    defaults = dict(
        gather_eff=1.0,
        tiles_per_core=1.0,
        call_overhead=20e-6,
        sector_bytes=32.0,
        k_half=0.0,
        sum_weight=0.0,
        dense_tiles=DENSE_TILES,
    )
    return HardwareProfile(**{**defaults, **values})


# Datasheet peaks. eff_dense: fraction of peak cuDNN convs reach at large batch. eff_sparse:
# gathered-row implicit GEMMs (Triton) assumed at 0.8 of that on tensor-core GPUs, whose MMA
# units starve on gathered operands (no bulk/TMA copies), and equal to it on the SIMT-only
# TX2, where the FMA pipes, not the loads, bound a tile. mem_eff: copy bandwidth / peak.
PRESETS: dict[str, HardwareProfile] = {
    "v100": _gpu(
        flops_fp32=15.7e12,
        flops_half=125e12,
        dram_bw=900e9,
        l2_bw=2.1e12,
        l2_size=6 * 2**20,
        cores=80.0,
        launch_overhead=4e-6,
        eff_dense=0.7,
        eff_sparse=0.56,
        mem_eff=0.85,
    ),
    "rtx3090": _gpu(
        flops_fp32=35.6e12,
        flops_half=71e12,
        dram_bw=936e9,
        l2_bw=2.0e12,
        l2_size=6 * 2**20,
        cores=82.0,
        launch_overhead=4e-6,
        eff_dense=0.7,
        eff_sparse=0.56,
        mem_eff=0.85,
    ),
    "jetson_tx2": _gpu(
        flops_fp32=0.665e12,
        flops_half=1.33e12,
        dram_bw=59.7e9,
        l2_bw=150e9,
        l2_size=512 * 2**10,
        cores=2.0,
        launch_overhead=10e-6,
        call_overhead=60e-6,
        eff_dense=0.7,
        eff_sparse=0.7,
        mem_eff=0.8,
    ),
    "a100": _gpu(
        flops_fp32=156e12,
        flops_half=312e12,
        dram_bw=2039e9,
        l2_bw=5.0e12,
        l2_size=40 * 2**20,
        cores=108.0,
        launch_overhead=3e-6,
        eff_dense=0.75,
        eff_sparse=0.6,
        mem_eff=0.88,
    ),
    "h100": _gpu(
        flops_fp32=494.7e12,
        flops_half=989.4e12,
        dram_bw=3350e9,
        l2_bw=8.0e12,
        l2_size=50 * 2**20,
        cores=132.0,
        launch_overhead=3e-6,
        eff_dense=0.81,
        eff_sparse=0.648,
        mem_eff=0.9,
    ),
}

PRESET_NOTES: dict[str, str] = {
    "v100": "V100 SXM2: 80 SMs, 15.7 TFLOP/s FP32, 125 TFLOP/s FP16 tensor (no bf16: half = fp16), "
    "900 GB/s HBM2, 6 MB L2 (~2.1 TB/s measured by Jia et al. 2018)",
    "rtx3090": "RTX 3090: 82 SMs, 35.6 TFLOP/s FP32 (= TF32 dense), 71 TFLOP/s bf16 tensor with "
    "FP32 accumulate, 936 GB/s GDDR6X, 6 MB L2",
    "jetson_tx2": "Jetson TX2 (Pascal, no tensor cores): 2 SMs, 0.665 TFLOP/s FP32, 1.33 TFLOP/s "
    "FP16, 59.7 GB/s LPDDR4 shared with the CPU, 512 KB L2",
    "a100": "A100 SXM4 80 GB: 108 SMs, 156 TFLOP/s TF32, 312 TFLOP/s bf16 dense, 2039 GB/s HBM2e, 40 MB L2",
    "h100": "H100 SXM5: 132 SMs, 495 TFLOP/s TF32, 989 TFLOP/s bf16 dense (eff 0.81 -> ~800 "
    "measured), 3.35 TB/s HBM3 (mem_eff 0.9 -> ~3.0 TB/s copy), 50 MB L2",
    "local": "fitted on this machine by `python -m laud_jax.latency calibrate`",
}

# Starting point of the local (CPU) fit: 2 cores of an AVX-512 server part.
LOCAL_INITIAL = HardwareProfile(
    flops_fp32=150e9,
    flops_half=75e9,
    dram_bw=20e9,
    l2_bw=60e9,
    l2_size=32 * 2**20,
    cores=float(os.cpu_count() or 1),
    tiles_per_core=1.0,
    launch_overhead=5e-6,
    loop_overhead=5e-6,
    call_overhead=30e-6,
    eff_dense=1.0,
    eff_conv=0.5,
    eff_grouped=0.05,
    eff_sparse=1.0,
    mem_eff=1.0,
    gather_eff=0.5,
    sector_bytes=4.0,  # activations and weights of a block stay in the 32 MB L3: no line waste
    k_half=16.0,
    sum_weight=0.5,
    dense_tiles=DENSE_TILES,
)

HARDWARE_NAMES = (*PRESETS, "local")


def profile_to_json(profile: HardwareProfile, path: str, *, name: str, meta: Mapping[str, Any] | None = None) -> None:
    """Write a profile (and free-form metadata such as fit errors) as JSON."""
    record = {"format": PROFILE_FORMAT, "name": name, "profile": profile.to_dict(), "meta": dict(meta or {})}
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def profile_from_json(path: str) -> tuple[HardwareProfile, dict[str, Any]]:
    """Read a profile JSON written by :func:`profile_to_json`; returns (profile, record)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no profile file at {path!r}; run `python -m laud_jax.latency calibrate --out {path}` "
            "to fit one, or pass a preset name"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path!r} is not valid JSON ({error})") from None
    if record.get("format") != PROFILE_FORMAT:
        raise ValueError(
            f"{path!r} is not a laud_jax latency profile (format {record.get('format')!r}, expected {PROFILE_FORMAT!r})"
        )
    values = record["profile"]
    missing = sorted(set(PROFILE_FIELDS) - set(values))
    if missing:
        raise ValueError(f"profile {path!r} lacks fields {missing}")
    profile = HardwareProfile(**{k: values[k] if k == "dense_tiles" else float(values[k]) for k in PROFILE_FIELDS})
    profile = profile.replace(dense_tiles=tuple(tuple(float(v) for v in t) for t in values["dense_tiles"]))
    return profile, record


def local_profile_path() -> str:
    return os.environ.get(LOCAL_PROFILE_ENV, DEFAULT_LOCAL_PROFILE)


def get_profile(hardware: str) -> HardwareProfile:
    """A preset by name (case-insensitive; ``local`` reads the fitted JSON) or a profile JSON path."""
    key = hardware.lower().replace("-", "_")
    aliases = {"3090": "rtx3090", "rtx_3090": "rtx3090", "tx2": "jetson_tx2", "jetsontx2": "jetson_tx2"}
    key = aliases.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    if key == "local":
        path = local_profile_path()
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no fitted local profile at {path!r} (set ${LOCAL_PROFILE_ENV} to another file); "
                "fit one with `python -m laud_jax.latency calibrate`"
            )
        return profile_from_json(path)[0]
    if hardware.endswith(".json") or os.path.exists(hardware):
        return profile_from_json(hardware)[0]
    raise ValueError(f"unknown hardware {hardware!r}; choose one of {list(HARDWARE_NAMES)} or a profile .json file")
