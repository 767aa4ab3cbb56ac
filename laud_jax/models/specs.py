"""Static structure of every network: model config, architectures, per-block shapes and MACs.

Pure Python (no JAX): the Flax modules, the MAC accounting, the sparse engine and the
latency predictor all read the same :class:`NetworkSpec`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

MODES = ("static", "spatial", "channel", "layer", "spatial+channel", "lc")
MODE_ALIASES = {"both": "spatial+channel"}  # accepted on input, stored as the canonical name
SPATIAL_MODES = ("spatial", "spatial+channel")
CHANNEL_MODES = ("channel", "spatial+channel", "lc")
LAYER_MODES = ("layer", "lc")
CHANNEL_MASK_POSITIONS = ("post_act", "pre_bn")
SE_POOLS = ("masked", "dense")
MASKER_INPUTS = ("pooled", "standardized")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ArchDef:
    """A residual network family member: stem, block type and stages."""

    block: str  # "bottleneck" or "basic"
    stem: str  # "resnet" (7x7/2 + maxpool), "regnet" (3x3/2), "small" (3x3/2, no pool)
    stem_width: int
    depths: tuple[int, ...]
    widths: tuple[int, ...]  # conv2 width per stage
    out_channels: tuple[int, ...]
    strides: tuple[int, ...]
    group_width: int = 0  # 0: dense conv2; else conv2 groups = width // group_width
    se_ratio: float = 0.0  # RegNetY squeeze-excitation: round(se_ratio * block input width)


def _resnet(block: str, depths, widths=(64, 128, 256, 512), stem="resnet", stem_width=64):
    expansion = 4 if block == "bottleneck" else 1
    return ArchDef(
        block=block,
        stem=stem,
        stem_width=stem_width,
        depths=tuple(depths),
        widths=tuple(widths),
        out_channels=tuple(w * expansion for w in widths),
        strides=(1, 2, 2, 2),
    )


def _make_divisible(value: float, divisor: int) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _regnet(depth: int, w_0: int, w_a: float, w_m: float, group_width: int) -> ArchDef:
    """RegNetY from its generating parameters (Radosavovic et al. 2020, torchvision's rule)."""
    quant = 8
    block_widths = []
    for i in range(depth):
        capacity = round(math.log((i * w_a + w_0) / w_0) / math.log(w_m))
        block_widths.append(int(round(w_0 * w_m**capacity / quant) * quant))
    stage_widths, stage_depths = [], []
    for width in block_widths:
        if stage_widths and stage_widths[-1] == width:
            stage_depths[-1] += 1
        else:
            stage_widths.append(width)
            stage_depths.append(1)
    group_widths = [min(group_width, w) for w in stage_widths]
    widths = [_make_divisible(w, g) for w, g in zip(stage_widths, group_widths)]
    return ArchDef(
        block="bottleneck",
        stem="regnet",
        stem_width=32,
        depths=tuple(stage_depths),
        widths=tuple(widths),
        out_channels=tuple(widths),
        strides=(2,) * len(widths),
        group_width=group_width,
        se_ratio=0.25,
    )


ARCHS: dict[str, ArchDef] = {
    "resnet18": _resnet("basic", (2, 2, 2, 2)),
    "resnet34": _resnet("basic", (3, 4, 6, 3)),
    "resnet50": _resnet("bottleneck", (3, 4, 6, 3)),
    "resnet101": _resnet("bottleneck", (3, 4, 23, 3)),
    "regnety_400mf": _regnet(16, 48, 27.89, 2.09, 8),
    "regnety_800mf": _regnet(14, 56, 38.84, 2.4, 16),
    "regnety_1_6gf": _regnet(27, 48, 20.71, 2.65, 24),
    # For 64x64 inputs (the embedded cluttered-MNIST canvases): stage grids 32/16/8/4.
    "resnet_small": _resnet("bottleneck", (1, 1, 2, 1), (16, 32, 48, 64), "small", 24),
    # A very small bottleneck network for tests.
    "resnet_tiny": _resnet("bottleneck", (1, 2, 1, 1), (4, 8, 8, 16), "small", 8),
}

DEFAULT_GRANULARITY = (4, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Validated model settings; ``mode`` and ``granularity`` are per stage."""

    arch: str
    num_classes: int
    mode: tuple[str, ...]
    granularity: tuple[int, ...]
    mask_groups: int = 1
    channel_granularity: int = 2
    channel_mask_position: str = "post_act"
    se_pool: str = "dense"
    masker_input: str = "pooled"
    dtype: str = "float32"
    zero_init_residual: bool = False
    stage_widths: tuple[int, ...] | None = None
    stage_depths: tuple[int, ...] | None = None
    stem_width: int | None = None

    @property
    def arch_def(self) -> ArchDef:
        base = ARCHS[self.arch]
        expansion = base.out_channels[0] // base.widths[0]
        widths = self.stage_widths or base.widths
        return dataclasses.replace(
            base,
            widths=tuple(widths),
            out_channels=tuple(w * expansion for w in widths) if self.stage_widths else base.out_channels,
            depths=tuple(self.stage_depths or base.depths),
            stem_width=self.stem_width or base.stem_width,
        )

    @property
    def num_stages(self) -> int:
        return len(ARCHS[self.arch].depths)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


MODEL_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def _per_stage(value, n: int, name: str, cast) -> tuple:
    if isinstance(value, str) and ("," in value or (cast is int and "-" in value)):
        value = [v.strip() for v in value.replace("-", ",").split(",") if v.strip()]
    if isinstance(value, (str, int)):
        value = [value] * n
    value = tuple(cast(v) for v in value)
    if len(value) != n:
        raise ValueError(f"model.{name} has {len(value)} entries {value}; the arch has {n} stages")
    return value


def model_config(cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Normalize and validate a model config (dict, ConfigDict or ModelConfig)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    unknown = sorted(set(cfg) - set(MODEL_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; known keys: {list(MODEL_CONFIG_KEYS)}")
    arch = cfg.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    n = len(ARCHS[arch].depths)
    for key in ("stage_widths", "stage_depths"):
        if cfg.get(key) is not None:
            cfg[key] = _per_stage(cfg[key], n, key, int)
            if min(cfg[key]) < 1:
                raise ValueError(f"model.{key} must be positive, got {cfg[key]}")
    if (cfg.get("stage_widths") or cfg.get("stem_width")) and ARCHS[arch].stem == "regnet":
        raise ValueError("stage_widths/stem_width overrides are for ResNet archs only")
    mode = tuple(MODE_ALIASES.get(m, m) for m in _per_stage(cfg.get("mode", "static"), n, "mode", str))
    bad = [m for m in mode if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {MODES}")
    granularity = _per_stage(cfg.get("granularity", DEFAULT_GRANULARITY), n, "granularity", int)
    if min(granularity) < 1:
        raise ValueError(f"model.granularity must be >= 1 per stage, got {granularity}")
    config = ModelConfig(
        arch=arch,
        num_classes=int(cfg.get("num_classes", 1000)),
        mode=mode,
        granularity=granularity,
        mask_groups=int(cfg.get("mask_groups", 1)),
        channel_granularity=int(cfg.get("channel_granularity", 2)),
        channel_mask_position=str(cfg.get("channel_mask_position", "post_act")),
        se_pool=str(cfg.get("se_pool", "dense")),
        masker_input=str(cfg.get("masker_input", "pooled")),
        dtype=str(cfg.get("dtype", "float32")),
        zero_init_residual=bool(cfg.get("zero_init_residual", False)),
        stage_widths=cfg.get("stage_widths"),
        stage_depths=cfg.get("stage_depths"),
        stem_width=cfg.get("stem_width"),
    )
    if config.num_classes < 1:
        raise ValueError(f"model.num_classes must be >= 1, got {config.num_classes}")
    if config.channel_mask_position not in CHANNEL_MASK_POSITIONS:
        raise ValueError(
            f"model.channel_mask_position={config.channel_mask_position!r}; choose from {CHANNEL_MASK_POSITIONS}"
        )
    if config.se_pool not in SE_POOLS:
        raise ValueError(f"model.se_pool={config.se_pool!r}; choose from {SE_POOLS}")
    if config.masker_input not in MASKER_INPUTS:
        raise ValueError(f"model.masker_input={config.masker_input!r}; choose from {MASKER_INPUTS}")
    if config.dtype not in DTYPES:
        raise ValueError(f"model.dtype={config.dtype!r}; choose from {DTYPES}")
    arch_def = config.arch_def
    for stage, stage_mode in enumerate(mode):
        width, out = arch_def.widths[stage], arch_def.out_channels[stage]
        if stage_mode in SPATIAL_MODES and (
            config.mask_groups < 1 or width % config.mask_groups or out % config.mask_groups
        ):
            raise ValueError(
                f"model.mask_groups={config.mask_groups} must divide stage {stage + 1}'s widths ({width}, {out})"
            )
        if stage_mode in CHANNEL_MODES and (config.channel_granularity < 1 or width % config.channel_granularity):
            raise ValueError(
                f"model.channel_granularity={config.channel_granularity} must divide stage {stage + 1}'s width {width}"
            )
    return config


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A stem or head layer: conv, maxpool or dense."""

    name: str
    kind: str  # "conv" | "maxpool" | "dense"
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    macs: int


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One residual block: shapes, dynamic settings and the static MAC count of each part."""

    name: str
    stage: int
    index: int
    kind: str  # "bottleneck" | "basic"
    in_channels: int
    width: int
    out_channels: int
    stride: int
    groups: int  # conv2 groups
    se_channels: int  # 0 when the block has no squeeze-excitation
    downsample: bool
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    mode: str
    granularity: int
    mask_groups: int
    channel_granularity: int
    channel_mask_position: str
    se_pool: str  # squeeze-excitation pooling under spatial masks: "masked" or "dense"
    masker_input: str  # spatial masker input: "pooled" or "standardized" over the mask grid
    conv1_macs: int
    conv2_macs: int
    conv3_macs: int  # 0 for basic blocks
    downsample_macs: int
    se_macs: int

    @property
    def spatial(self) -> bool:
        return self.mode in SPATIAL_MODES

    @property
    def channel(self) -> bool:
        return self.mode in CHANNEL_MODES

    @property
    def layer(self) -> bool:
        return self.mode in LAYER_MODES

    @property
    def mask_grid(self) -> tuple[int, int]:
        """Spatial mask grid (h_out / S, w_out / S); (1, 1) when the block has no spatial mask."""
        if not self.spatial:
            return (1, 1)
        return (self.h_out // self.granularity, self.w_out // self.granularity)

    @property
    def channel_groups(self) -> int:
        """Gc: number of channel-mask groups of conv1/conv2's width (0 without channel mask)."""
        return self.width // self.channel_granularity if self.channel else 0

    @property
    def conv1_hw(self) -> tuple[int, int]:
        """Grid on which conv1 is computed (input grid for bottleneck, output grid for basic)."""
        return (self.h_in, self.w_in) if self.kind == "bottleneck" else (self.h_out, self.w_out)

    @property
    def dense_macs(self) -> int:
        return self.conv1_macs + self.conv2_macs + self.conv3_macs + self.downsample_macs + self.se_macs

    @property
    def masker_macs(self) -> int:
        """MACs of the maskers/gates this block's mode adds (run on every input)."""
        macs = 0
        if self.spatial:
            grid = self.mask_grid
            macs += grid[0] * grid[1] * self.in_channels * 2 * self.mask_groups
        if self.channel:
            hidden = max(self.channel_groups // 16, 16)
            macs += self.in_channels * hidden + hidden * 2 * self.channel_groups
        if self.layer:
            macs += self.in_channels * 2
        if self.mode == "lc":
            macs += self.in_channels * (self.channel_groups + 1)
        return macs


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    config: ModelConfig
    image_shape: tuple[int, int, int]
    stem: tuple[LayerSpec, ...]
    blocks: tuple[BlockSpec, ...]
    head: tuple[LayerSpec, ...]

    @property
    def fixed_macs(self) -> int:
        """Stem + head MACs (never dynamic)."""
        return sum(layer.macs for layer in self.stem + self.head)

    @property
    def dense_macs(self) -> int:
        """F_full: MACs of the static network."""
        return self.fixed_macs + sum(block.dense_macs for block in self.blocks)

    def stage_blocks(self, stage: int) -> tuple[BlockSpec, ...]:
        return tuple(b for b in self.blocks if b.stage == stage)


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv_macs(h_out: int, w_out: int, c_in: int, c_out: int, kernel: int, groups: int = 1) -> int:
    return h_out * w_out * c_out * (c_in // groups) * kernel * kernel


def _stem(arch: ArchDef, h: int, w: int, c: int) -> list[LayerSpec]:
    kernel = 7 if arch.stem == "resnet" else 3
    pad = kernel // 2
    ho, wo = conv_out(h, kernel, 2, pad), conv_out(w, kernel, 2, pad)
    layers = [
        LayerSpec(
            "stem_conv",
            "conv",
            c,
            arch.stem_width,
            kernel,
            2,
            h,
            w,
            ho,
            wo,
            conv_macs(ho, wo, c, arch.stem_width, kernel),
        )
    ]
    if arch.stem == "resnet":
        po, qo = conv_out(ho, 3, 2, 1), conv_out(wo, 3, 2, 1)
        layers.append(LayerSpec("stem_pool", "maxpool", arch.stem_width, arch.stem_width, 3, 2, ho, wo, po, qo, 0))
    return layers


def network_spec(cfg: ModelConfig | Mapping[str, Any], image_shape: Sequence[int]) -> NetworkSpec:
    """Static structure of the network for images of ``image_shape`` = (H, W) or (H, W, C)."""
    config = model_config(cfg)
    arch = config.arch_def
    if len(image_shape) not in (2, 3):
        raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {tuple(image_shape)}")
    h, w = int(image_shape[0]), int(image_shape[1])
    c = int(image_shape[2]) if len(image_shape) == 3 else 3
    stem = _stem(arch, h, w, c)
    h, w, cin = stem[-1].h_out, stem[-1].w_out, stem[-1].out_channels
    if min(h, w) < 1:
        raise ValueError(f"image of shape {tuple(image_shape)} is too small for {config.arch}")
    blocks = []
    for stage, depth in enumerate(arch.depths):
        width, cout = arch.widths[stage], arch.out_channels[stage]
        mode, granularity = config.mode[stage], config.granularity[stage]
        groups = width // min(arch.group_width, width) if arch.group_width else 1
        for index in range(depth):
            stride = arch.strides[stage] if index == 0 else 1
            ho, wo = conv_out(h, 3, stride, 1), conv_out(w, 3, stride, 1)
            se = round(arch.se_ratio * cin) if arch.se_ratio else 0
            downsample = stride != 1 or cin != cout
            if arch.block == "bottleneck":
                conv1 = conv_macs(h, w, cin, width, 1)
                conv2 = conv_macs(ho, wo, width, width, 3, groups)
                conv3 = conv_macs(ho, wo, width, cout, 1)
            else:
                conv1 = conv_macs(ho, wo, cin, width, 3)
                conv2 = conv_macs(ho, wo, width, cout, 3)
                conv3 = 0
            block = BlockSpec(
                name=f"layer{stage + 1}_{index}",
                stage=stage,
                index=index,
                kind=arch.block,
                in_channels=cin,
                width=width,
                out_channels=cout,
                stride=stride,
                groups=groups,
                se_channels=se,
                downsample=downsample,
                h_in=h,
                w_in=w,
                h_out=ho,
                w_out=wo,
                mode=mode,
                granularity=granularity,
                mask_groups=config.mask_groups,
                channel_granularity=config.channel_granularity,
                channel_mask_position=config.channel_mask_position,
                se_pool=config.se_pool,
                masker_input=config.masker_input,
                conv1_macs=conv1,
                conv2_macs=conv2,
                conv3_macs=conv3,
                downsample_macs=conv_macs(ho, wo, cin, cout, 1) if downsample else 0,
                se_macs=2 * width * se,
            )
            if block.spatial and (ho % granularity or wo % granularity):
                divisors = [d for d in range(1, ho + 1) if ho % d == 0 and wo % d == 0]
                raise ValueError(
                    f"granularity S={granularity} of stage {stage + 1} does not divide its "
                    f"{ho}x{wo} feature map (image {tuple(image_shape)}); choose S from {divisors}"
                )
            blocks.append(block)
            h, w, cin = ho, wo, cout
    head = (LayerSpec("fc", "dense", cin, config.num_classes, 1, 1, 1, 1, 1, 1, cin * config.num_classes),)
    return NetworkSpec(config, (int(image_shape[0]), int(image_shape[1]), c), tuple(stem), tuple(blocks), head)
