"""Import PyTorch weights: torchvision ResNet/RegNetY, LAUDNet and LASNet checkpoints.

    python -m laud_jax.convert resnet50-19c8e357.pth converted/resnet50
    python -m laud_jax.convert laudnet_r50_channel.pth.tar converted/laud_r50 --image-size 224

Reads the file with the restricted unpickler of :mod:`laud_jax.torch_pickle` (no torch
needed, no pickled code run), infers the architecture and the dynamic settings from the
weights (and from the ``hyper_set`` record that LAUDNet/LASNet checkpoints carry), maps
every tensor onto the Flax model (conv OIHW -> HWIO, linear transposed, BN running
statistics into ``batch_stats``) and checks the result strictly: missing, unexpected or
mis-shaped tensors are all listed in one :class:`ConversionError`. The output directory has
the layout of a ``laud_jax.train`` work directory (``config.json`` + an orbax checkpoint
under ``checkpoints/0``), so training (``init_from``, ``teacher.source``), evaluation and
the benchmark accept it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from laud_jax import torch_pickle
from laud_jax.models.specs import (
    ARCHS,
    CHANNEL_MODES,
    MODEL_CONFIG_KEYS,
    SPATIAL_MODES,
    NetworkSpec,
    model_config,
    network_spec,
)

DEFAULT_IMAGE_SIZE = 224  # ImageNet: what the granularity of released checkpoints refers to
IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(ValueError):
    """The checkpoint does not fit the requested/inferred model (the message lists why)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a checkpoint's names come from: ``family`` resnet|regnet, ``source``
    torchvision (static) | laudnet | lasnet."""

    family: str
    source: str

    @property
    def channel_mask_position(self) -> str:
        # LAUDNet masks ResNet channels between conv and BN, RegNet channels after conv-BN-relu.
        return "pre_bn" if (self.family, self.source) == ("resnet", "laudnet") else "post_act"


@dataclasses.dataclass
class TorchCheckpoint:
    """A state_dict (numpy arrays) plus the settings the file records about itself."""

    path: str
    state_dict: dict[str, np.ndarray]
    recorded: dict[str, Any]
    layout: Layout


# ----------------------------------------------------------------------------- reading


def _find_state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state", "model_state_dict", "net"):
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
    found = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(
        f"{path} holds no state_dict (a dict of tensors, or one under 'state_dict'/'model'); found {found}"
    )


def _strip_prefix(state: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    for prefix in ("module.", "model.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    prefixed = [k for k in state if k.startswith("module.")]
    if prefixed:
        raise ConversionError(
            f"{path}: {len(prefixed)} of {len(state)} keys start with 'module.' and the others do "
            f"not (e.g. {prefixed[0]!r}); the file mixes two models"
        )
    return state


def _recorded_settings(obj: Any) -> dict[str, Any]:
    """Settings a LAUDNet/LASNet checkpoint records: the arch name and ``hyper_set`` fields."""
    recorded: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        return recorded
    if isinstance(obj.get("model"), str):
        recorded["arch_name"] = obj["model"]
    text = obj.get("hyper_set")
    if not isinstance(text, str) and isinstance(obj.get("args"), argparse.Namespace):
        text = repr(obj["args"])
    if isinstance(text, str):
        for field in (
            "dyn_mode",
            "mask_spatial_granularity",
            "mask_channel_group",
            "channel_dyn_granularity",
            "channel_masker",
            "channel_masker_layers",
            "channel_masker_reduction",
        ):
            match = re.search(rf"\b{field}='([^']*)'", text)
            if match:
                recorded[field] = match.group(1).split("-")
        match = re.search(r"\bIMAGE_SIZE=(\d+)", text)
        if match:
            recorded["image_size"] = int(match.group(1))
    return recorded


def detect_layout(state: Mapping[str, np.ndarray], path: str = "checkpoint") -> Layout:
    """Family (resnet/regnet) and source (torchvision/laudnet/lasnet) from the key names."""
    keys = list(state)
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in keys):
        family = "resnet"
    elif "stem.0.weight" in state and any(k.startswith("trunk_output.") for k in keys):
        family = "regnet"
    else:
        raise ConversionError(
            f"{path} is neither a torchvision-style ResNet (conv1, layer1..4, fc) nor RegNet "
            f"(stem, trunk_output, fc) state_dict; first keys: {keys[:6]}"
        )
    if any(".masker_spatial." in k or ".masker_channel." in k for k in keys):
        source = "laudnet"
    elif any(".masker." in k for k in keys):
        source = "lasnet"
    else:
        source = "torchvision"
    return Layout(family, source)


def read_torch_checkpoint(path: str | os.PathLike) -> TorchCheckpoint:
    """Read a .pth/.pth.tar file safely and locate its state_dict and recorded settings."""
    path = os.fspath(path)
    obj = torch_pickle.load(path)
    state = _strip_prefix(_find_state_dict(obj, path), path)
    return TorchCheckpoint(path, state, _recorded_settings(obj), detect_layout(state, path))


# ----------------------------------------------------------------------------- names


def block_prefix(layout: Layout, stage: int, index: int) -> str:
    """Torch name prefix of block ``index`` of stage ``stage`` (both 0-based)."""
    if layout.family == "resnet":
        return f"layer{stage + 1}.{index}."
    return f"trunk_output.block{stage + 1}.block{stage + 1}-{index}."


def _block_names(layout: Layout) -> dict[str, str]:
    if layout.family == "resnet":
        return {
            "conv1": "conv1",
            "bn1": "bn1",
            "conv2": "conv2",
            "bn2": "bn2",
            "conv3": "conv3",
            "bn3": "bn3",
            "downsample_conv": "downsample.0",
            "downsample_bn": "downsample.1",
        }
    return {
        "conv1": "f.a.0",
        "bn1": "f.a.1",
        "conv2": "f.b.0",
        "bn2": "f.b.1",
        "conv3": "f.c.0",
        "bn3": "f.c.1",
        "downsample_conv": "proj.0",
        "downsample_bn": "proj.1",
        "se/reduce": "f.se.fc1",
        "se/expand": "f.se.fc2",
    }


def _gate_names(layout: Layout) -> dict[str, str]:
    inner = "f." if layout.family == "regnet" else ""
    if layout.source == "lasnet":
        return {"gates/masker_spatial/conv": "masker.conv2"}
    return {
        "gates/masker_spatial/conv": f"{inner}masker_spatial.conv",
        # LAUDNet's layer mode is its spatial masker with a 1x1 mask grid.
        "gates/layer_gate/conv": f"{inner}masker_spatial.conv",
        "gates/masker_channel/fc1": f"{inner}masker_channel.conv.0",
        "gates/masker_channel/fc2": f"{inner}masker_channel.conv.2",
    }


def torch_name_map(spec: NetworkSpec, layout: Layout) -> dict[tuple[str, ...], str]:
    """Flax variable path (collection, module..., leaf) -> torch state_dict key."""
    stem_conv, stem_bn = ("conv1", "bn1") if layout.family == "resnet" else ("stem.0", "stem.1")
    modules = {("stem_conv",): stem_conv, ("stem_bn",): stem_bn, ("fc",): "fc"}
    block_names, gate_names = _block_names(layout), _gate_names(layout)
    for block in spec.blocks:
        prefix = block_prefix(layout, block.stage, block.index)
        for flax_name, torch_name in {**block_names, **gate_names}.items():
            modules[(block.name, *flax_name.split("/"))] = prefix + torch_name
    names = {}
    for module, torch_module in modules.items():
        last = module[-1]
        if last.startswith("bn") or last.endswith("_bn"):
            names[("params", *module, "scale")] = torch_module + ".weight"
            names[("params", *module, "bias")] = torch_module + ".bias"
            names[("batch_stats", *module, "mean")] = torch_module + ".running_mean"
            names[("batch_stats", *module, "var")] = torch_module + ".running_var"
        else:
            names[("params", *module, "kernel")] = torch_module + ".weight"
            names[("params", *module, "bias")] = torch_module + ".bias"
    return names


def to_flax(array: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
    """Torch tensor -> Flax layout for a leaf of ``flax_shape`` (None if it cannot fit)."""
    array = np.asarray(array)
    if len(flax_shape) == 4 and array.ndim == 4:  # conv OIHW -> HWIO
        out = array.transpose(2, 3, 1, 0)
    elif len(flax_shape) == 2 and array.ndim == 2:  # linear (out, in) -> (in, out)
        out = array.T
    elif len(flax_shape) == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):  # 1x1 conv as dense
        out = array[:, :, 0, 0].T
    elif len(flax_shape) == 1 and array.ndim == 1:
        out = array
    else:
        return None
    return out if out.shape == tuple(flax_shape) else None


def expected_torch_shape(flax_shape: tuple[int, ...], torch_ndim: int) -> tuple[int, ...]:
    """The torch shape that maps onto ``flax_shape`` (for error messages)."""
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        i, o = flax_shape
        return (o, i, 1, 1) if torch_ndim == 4 else (o, i)
    return tuple(flax_shape)


# ----------------------------------------------------------------------------- inference


def _stage_depths(state: Mapping[str, np.ndarray], layout: Layout) -> tuple[int, ...]:
    pattern = (
        re.compile(r"^layer(\d+)\.(\d+)\.")
        if layout.family == "resnet"
        else re.compile(r"^trunk_output\.block(\d+)\.block\d+-(\d+)\.")
    )
    seen: dict[int, set[int]] = {}
    for key in state:
        match = pattern.match(key)
        if match:
            seen.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    stages = sorted(seen)
    if stages != list(range(1, len(stages) + 1)) or len(stages) != 4:
        raise ConversionError(f"expected 4 stages numbered 1..4 in the checkpoint, found {stages}")
    for stage in stages:
        if sorted(seen[stage]) != list(range(len(seen[stage]))):
            raise ConversionError(f"stage {stage} has blocks {sorted(seen[stage])}: not numbered 0..n-1")
    return tuple(len(seen[s]) for s in stages)


def _shape(state: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"the checkpoint lacks {key!r}, which its layout needs")
    return tuple(state[key].shape)


def infer_architecture(state: Mapping[str, np.ndarray], layout: Layout) -> dict[str, Any]:
    """arch (+ stage_depths / stage_widths / stem_width overrides) and num_classes."""
    depths = _stage_depths(state, layout)
    num_classes = _shape(state, "fc.weight")[0]
    names = _block_names(layout)
    widths = tuple(_shape(state, block_prefix(layout, s, 0) + names["conv1"] + ".weight")[0] for s in range(4))
    cfg: dict[str, Any] = {"num_classes": num_classes}
    if layout.family == "resnet":
        stem = _shape(state, "conv1.weight")
        if stem[2] != 7:
            raise ConversionError(f"ResNet stem conv is {stem[2]}x{stem[3]}; only torchvision's 7x7 stem is supported")
        bottleneck = block_prefix(layout, 0, 0) + "conv3.weight" in state
        defaults = {
            (False, (2, 2, 2, 2)): "resnet18",
            (False, (3, 4, 6, 3)): "resnet34",
            (True, (3, 4, 6, 3)): "resnet50",
            (True, (3, 4, 23, 3)): "resnet101",
        }
        arch = defaults.get((bottleneck, depths), "resnet50" if bottleneck else "resnet18")
        cfg["arch"] = arch
        if depths != ARCHS[arch].depths:
            cfg["stage_depths"] = depths
        if widths != ARCHS[arch].widths:
            cfg["stage_widths"] = widths
        if stem[0] != ARCHS[arch].stem_width:
            cfg["stem_width"] = stem[0]
        return cfg
    regnets = {name: a for name, a in ARCHS.items() if a.stem == "regnet"}
    matches = [name for name, a in regnets.items() if a.widths == widths]
    if not matches:
        known = {name: a.widths for name, a in regnets.items()}
        raise ConversionError(f"RegNet stage widths {widths} match no supported RegNetY {known}")
    cfg["arch"] = matches[0]
    if depths != ARCHS[matches[0]].depths:
        cfg["stage_depths"] = depths
    return cfg


def _per_stage_record(values: Sequence[str] | None, depths: Sequence[int], what: str) -> list[str] | None:
    """A recorded per-stage (LAUDNet) or per-block (LASNet) list, reduced to per stage."""
    if values is None:
        return None
    if len(values) == len(depths):
        return list(values)
    if len(values) == sum(depths):
        out, start = [], 0
        for depth in depths:
            stage_values = set(values[start : start + depth])
            if len(stage_values) != 1:
                raise ConversionError(
                    f"the checkpoint records per-block {what} {'-'.join(values)}; laud_jax needs one "
                    f"value per stage, but stage {len(out) + 1} has {sorted(stage_values)}"
                )
            out.append(stage_values.pop())
            start += depth
        return out
    return None


def _gate_prefix(layout: Layout, stage: int, index: int) -> str:
    """Prefix of a block's masker modules (LAUDNet RegNets keep them inside ``f``)."""
    inner = "f." if (layout.family, layout.source) == ("regnet", "laudnet") else ""
    return block_prefix(layout, stage, index) + inner


def _block_mode(state: Mapping[str, np.ndarray], layout: Layout, stage: int, index: int) -> str:
    """static | spatial | channel | spatial+channel | 'spatial|layer' (LAUDNet's masker_spatial alone)."""
    prefix = _gate_prefix(layout, stage, index)
    if layout.source == "lasnet":
        if prefix + "masker.conv2.weight" not in state:
            raise ConversionError(f"LASNet checkpoint: block {prefix} has no masker ({prefix}masker.conv2.weight)")
        return "spatial"
    has_spatial = prefix + "masker_spatial.conv.weight" in state
    has_channel = any(k.startswith(prefix + "masker_channel.") for k in state)
    if has_channel and prefix + "masker_channel.conv.0.weight" not in state:
        kind = (
            "a single linear layer (channel_masker_layers=1)"
            if prefix + "masker_channel.conv.weight" in state
            else "a conv_linear masker"
        )
        raise ConversionError(
            f"{prefix}masker_channel is {kind}; laud_jax implements LAUDNet's two-layer MLP "
            "channel masker (channel_masker='MLP', channel_masker_layers=2) only"
        )
    if has_spatial and has_channel:
        return "spatial+channel"
    if has_channel:
        return "channel"
    return "spatial|layer" if has_spatial else "static"


def _as_stage_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    values = [v for v in value.replace("-", ",").split(",") if v] if isinstance(value, str) else list(value)
    return values * 4 if len(values) == 1 else values


def infer_dynamic_settings(
    state: Mapping[str, np.ndarray],
    layout: Layout,
    depths: Sequence[int],
    widths: Sequence[int],
    recorded: Mapping[str, Any],
    user: Mapping[str, Any],
) -> dict[str, Any]:
    """mode, granularity, mask_groups, channel_granularity, channel_mask_position.

    The maskers present give each stage's mode; LAUDNet's ``masker_spatial`` alone means
    spatial or layer mode, decided by ``user['mode']`` or the recorded ``dyn_mode``. Groups
    come from the maskers' output widths; S from ``user['granularity']`` or the record.
    """
    if layout.source == "torchvision":
        return {"mode": "static"}
    recorded_modes = _per_stage_record(recorded.get("dyn_mode"), depths, "dyn_mode")
    user_modes = _as_stage_list(user.get("mode"))
    modes = []
    for stage, depth in enumerate(depths):
        stage_modes = {_block_mode(state, layout, stage, index) for index in range(depth)}
        if len(stage_modes) != 1:
            raise ConversionError(
                f"stage {stage + 1} mixes block modes {sorted(stage_modes)}; laud_jax sets one mode per stage"
            )
        mode = stage_modes.pop()
        if mode == "spatial|layer":
            mode = (user_modes or recorded_modes or [None] * 4)[stage]
            if mode not in ("spatial", "layer"):
                raise ConversionError(
                    f"stage {stage + 1} has only LAUDNet's masker_spatial, which serves both its spatial "
                    "and its layer mode, and the file does not record which: pass mode (e.g. "
                    "--mode spatial,spatial,layer,layer)"
                )
        modes.append(mode)
    settings: dict[str, Any] = {"mode": tuple(modes), "channel_mask_position": layout.channel_mask_position}
    if layout.family == "regnet":  # the released RegNets pool squeeze-excitation over all positions
        settings["se_pool"] = "dense"
    masker = "masker.conv2.weight" if layout.source == "lasnet" else "masker_spatial.conv.weight"
    groups = {
        state[_gate_prefix(layout, s, i) + masker].shape[0] // 2
        for s, m in enumerate(modes)
        if m in SPATIAL_MODES
        for i in range(depths[s])
    }
    if len(groups) > 1:
        raise ConversionError(
            f"spatial mask groups differ between blocks {sorted(groups)}; laud_jax uses one mask_groups"
        )
    if groups:
        settings["mask_groups"] = groups.pop()
    granularities = set()
    for s, m in enumerate(modes):
        if m in CHANNEL_MODES:
            key = _gate_prefix(layout, s, 0) + "masker_channel.conv.2.weight"
            channel_groups = state[key].shape[0] // 2
            if channel_groups < 1 or widths[s] % channel_groups:
                raise ConversionError(
                    f"{key}: {channel_groups} channel groups do not divide stage {s + 1}'s width {widths[s]}"
                )
            granularities.add(widths[s] // channel_groups)
    if len(granularities) > 1:
        raise ConversionError(
            f"channels per channel-mask group differ between stages {sorted(granularities)}; "
            "laud_jax uses one channel_granularity"
        )
    if granularities:
        settings["channel_granularity"] = granularities.pop()
    if any(m in SPATIAL_MODES for m in modes) and user.get("granularity") is None:
        recorded_s = _per_stage_record(recorded.get("mask_spatial_granularity"), depths, "mask_spatial_granularity")
        if recorded_s is None:
            raise ConversionError(
                "the checkpoint has spatial maskers but records no mask granularity: pass granularity "
                "(S per stage, e.g. --granularity 4,4,2,1 for LASNet's ResNet-50 4-4-2-1)"
            )
        settings["granularity"] = tuple(int(recorded_s[s]) if m in SPATIAL_MODES else 1 for s, m in enumerate(modes))
    return settings


def infer_model_config(checkpoint: TorchCheckpoint, **user: Any) -> dict[str, Any]:
    """The model config for a checkpoint: inferred values, overridden by ``user`` values."""
    unknown = sorted(set(user) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise ConversionError(f"unknown model config keys {unknown}; known: {list(MODEL_CONFIG_KEYS)}")
    user = {k: v for k, v in user.items() if v is not None}
    if isinstance(user.get("mode"), str):
        user["mode"] = tuple(_as_stage_list(user["mode"]))
    state, layout = checkpoint.state_dict, checkpoint.layout
    cfg = infer_architecture(state, layout)
    arch = ARCHS[cfg["arch"]]
    depths = cfg.get("stage_depths", arch.depths)
    widths = cfg.get("stage_widths", arch.widths)
    cfg.update(infer_dynamic_settings(state, layout, depths, widths, checkpoint.recorded, user))
    cfg.update(user)
    return cfg


# ----------------------------------------------------------------------------- conversion


def _abstract_variables(cfg: Mapping[str, Any], image_size: int) -> tuple[Any, NetworkSpec]:
    import jax
    import jax.numpy as jnp

    from laud_jax.models import build_model

    spec = network_spec(cfg, (image_size, image_size, 3))
    model = build_model(cfg)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), images)
    return shapes, spec


def _format_list(title: str, items: list[str], limit: int = 40) -> str:
    shown = "\n    ".join(items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    cfg: Mapping[str, Any],
    layout: Layout,
    image_size: int = 224,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Flax ``{'params', 'batch_stats'}`` (float32 numpy) for model config ``cfg``.

    Every model variable must come from exactly one tensor of the right shape and every
    tensor must be used (BN ``num_batches_tracked`` aside); otherwise a
    :class:`ConversionError` lists all missing, unexpected and mis-shaped keys.
    """
    import jax

    config = model_config(cfg)
    shapes, spec = _abstract_variables(config, image_size)
    names = torch_name_map(spec, layout)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    out: dict[tuple[str, ...], np.ndarray] = {}
    missing, misshaped, no_source, used = [], [], [], set()
    for path, leaf in flat:
        key_path = tuple(str(getattr(p, "key", p)) for p in path)
        torch_key = names.get(key_path)
        if torch_key is None:
            no_source.append("/".join(key_path))
            continue
        if torch_key not in state:
            torch_ndim = 4 if len(leaf.shape) == 4 or "se" in key_path else len(leaf.shape)
            missing.append(
                f"{torch_key}  (for {'/'.join(key_path)}, torch shape {expected_torch_shape(leaf.shape, torch_ndim)})"
            )
            continue
        used.add(torch_key)
        value = to_flax(state[torch_key], tuple(leaf.shape))
        if value is None:
            want = expected_torch_shape(tuple(leaf.shape), np.ndim(state[torch_key]))
            misshaped.append(f"{torch_key}: checkpoint {tuple(np.shape(state[torch_key]))}, model needs {want}")
            continue
        out[key_path] = np.asarray(value, np.float32)
    unexpected = sorted(k for k in state if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if no_source:
        modes = sorted(set(config.mode))
        raise ConversionError(
            f"{source}: the model (modes {modes}) has variables that no {layout.source} checkpoint "
            f"provides (LC-Net's 'lc' mode has no PyTorch counterpart):\n"
            + _format_list("without a torch source", no_source)
        )
    if missing or unexpected or misshaped:
        parts = [f"{source} does not fit the model {_describe(config)} ({layout.source} {layout.family} layout):"]
        if missing:
            parts.append(_format_list("missing from the checkpoint", missing))
        if unexpected:
            parts.append(_format_list("unexpected in the checkpoint", unexpected))
        if misshaped:
            parts.append(_format_list("mis-shaped", misshaped))
        parts.append(
            "  If the inferred settings are wrong, pass them explicitly (arch, num_classes, mode, "
            "granularity, mask_groups, channel_granularity)."
        )
        raise ConversionError("\n".join(parts))
    variables: dict[str, Any] = {}
    for key_path, value in out.items():
        node = variables
        for part in key_path[:-1]:
            node = node.setdefault(part, {})
        node[key_path[-1]] = value
    variables.setdefault("batch_stats", {})
    return variables


def _describe(config: Any) -> str:
    cfg = model_config(config)
    fields = {k: v for k, v in cfg.to_dict().items() if v is not None}
    return json.dumps(fields, default=list)


def convert_checkpoint(
    path: str | os.PathLike, image_size: int | None = None, **user: Any
) -> tuple[dict[str, Any], dict[str, Any], TorchCheckpoint]:
    """(model config, variables, the read checkpoint) for a PyTorch file."""
    checkpoint = read_torch_checkpoint(path)
    cfg = infer_model_config(checkpoint, **user)
    size = image_size or checkpoint.recorded.get("image_size") or DEFAULT_IMAGE_SIZE
    try:
        variables = convert_state_dict(checkpoint.state_dict, cfg, checkpoint.layout, size, checkpoint.path)
    except ValueError as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{checkpoint.path}: invalid model config {cfg}: {e}") from e
    return _jsonable(cfg), variables, checkpoint


def _jsonable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


# ----------------------------------------------------------------------------- storage


def save_converted(
    out_dir: str | os.PathLike,
    cfg: Mapping[str, Any],
    variables: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``config.json`` + an orbax checkpoint (step 0) in the train work-dir layout."""
    from laud_jax import checkpointing

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    checkpointing.save_variables(out_dir, {"model": _jsonable(cfg), "converted_from": dict(info or {})}, variables)
    return out_dir


def load_pretrained(source: str | os.PathLike, image_size: int | None = None, **model_config_overrides: Any):
    """``(model, variables)`` ready for ``model.apply(variables, images_nhwc)`` in eval mode.

    ``source``: a ``.pth``/``.pth.tar`` file (converted on the fly; keyword arguments give
    or override the model config, with the registry's names) or a converted / trained
    directory (keyword arguments must agree with its config; ``dtype`` may be changed).
    A directory that cannot be read raises :class:`laud_jax.CheckpointError`, a
    ``ValueError`` whose one-line message names the file and what to do.
    """
    from laud_jax.models import build_model

    source = os.fspath(source)
    if os.path.isdir(source):
        from laud_jax import checkpointing

        variables, recorded = checkpointing.load_variables(source)
        cfg = recorded["model"]
        conflicts = {
            k: (cfg.get(k), v)
            for k, v in model_config_overrides.items()
            if k != "dtype" and _jsonable({k: v})[k] != cfg.get(k)
        }
        if conflicts:
            raise ConversionError(
                f"{source} was converted with different settings: "
                + ", ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in conflicts.items())
            )
        cfg = {**cfg, **{k: v for k, v in model_config_overrides.items() if k == "dtype"}}
    else:
        cfg, variables, _ = convert_checkpoint(source, image_size=image_size, **model_config_overrides)
    return build_model(cfg), variables


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.split(r"[,-]", text) if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m laud_jax.convert",
        description=(
            "Convert a PyTorch checkpoint (torchvision ResNet-18/34/50/101 or RegNetY, LAUDNet, "
            "LASNet; .pth or .pth.tar, with or without 'module.' prefixes) into a laud_jax "
            "checkpoint directory. torch is not needed; the file's pickle may only rebuild "
            "tensors and plain containers. Settings the weights do not reveal are read from "
            "the checkpoint's hyper_set record or given here."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="PyTorch file (.pth / .pth.tar)")
    parser.add_argument("output", help="directory to write (config.json + orbax checkpoint)")
    parser.add_argument("--arch", help="architecture (default: inferred)", choices=sorted(ARCHS))
    parser.add_argument("--num-classes", type=int, help="classifier width (default: from fc.weight)")
    parser.add_argument(
        "--mode",
        help="dynamic mode, one or per stage: static|spatial|channel|layer|spatial+channel (alias both), "
        "e.g. channel,channel,spatial+channel,layer",
    )
    parser.add_argument("--granularity", type=_int_list, help="spatial patch size S per stage, e.g. 4,4,2,1")
    parser.add_argument("--mask-groups", type=int, help="spatial mask groups G (default: from the masker)")
    parser.add_argument(
        "--channel-granularity", type=int, help="channels per channel-mask group (default: from the masker)"
    )
    parser.add_argument(
        "--channel-mask-position",
        choices=("post_act", "pre_bn"),
        help="default: pre_bn for LAUDNet ResNets, post_act otherwise",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype recorded in the config")
    parser.add_argument(
        "--image-size", type=int, help="input size the granularity is checked against (default: recorded, else 224)"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    user = {
        "arch": args.arch,
        "num_classes": args.num_classes,
        "mode": args.mode,
        "granularity": args.granularity,
        "mask_groups": args.mask_groups,
        "channel_granularity": args.channel_granularity,
        "channel_mask_position": args.channel_mask_position,
        "dtype": args.dtype,
    }
    if os.path.exists(args.output) and os.listdir(args.output) and not args.force:
        print(f"error: {args.output} exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    try:
        cfg, variables, checkpoint = convert_checkpoint(args.source, image_size=args.image_size, **user)
    except (ConversionError, torch_pickle.CheckpointFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = sum(int(np.prod(np.shape(v))) for v in _leaves(variables))
    info = {
        "source": os.path.abspath(checkpoint.path),
        "layout": dataclasses.asdict(checkpoint.layout),
        "recorded": {k: v for k, v in checkpoint.recorded.items()},
    }
    out = save_converted(args.output, cfg, variables, info, overwrite=args.force)
    print(
        f"read     {checkpoint.path}: {checkpoint.layout.source} {checkpoint.layout.family}, "
        f"{len(checkpoint.state_dict)} tensors"
    )
    print(f"model    {json.dumps(cfg)}")
    print(f"wrote    {out} ({count:,} values)")
    return 0


def _leaves(tree: Any):
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


if __name__ == "__main__":
    sys.exit(main())
