"""The dynamic residual network (ResNet / RegNetY families): stem, dynamic blocks, head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from laud_jax.models.blocks import DynamicBasicBlock, DynamicBottleneck, batch_norm, conv_init
from laud_jax.models.specs import ModelConfig, network_spec


class DynamicNet(nn.Module):
    """Returns ``(logits, aux)``; ``aux`` holds one record per block plus network MACs.

    ``tau`` (Gumbel temperature) is traced, so a new value never recompiles. ``masks``
    (one dict per block with any of ``spatial``/``channel``/``layer``) forces the gates.
    ``gate_offset`` shifts the evaluation threshold (execute iff l_exec - l_skip >= offset).
    ``gumbel_noise=False`` trains with deterministic hard gates (the same straight-through
    gradient without the Gumbel noise), for tests and debugging.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        tau: jax.Array | float = 1.0,
        masks: Sequence[Mapping[str, Any] | None] | None = None,
        gate_offset: jax.Array | float = 0.0,
        gumbel_noise: bool = True,
    ) -> tuple[jax.Array, dict[str, Any]]:
        if images.ndim != 4:
            raise ValueError(f"images must be NHWC (B, H, W, C); got shape {images.shape}")
        spec = network_spec(self.config, images.shape[1:])
        if masks is not None and len(masks) != len(spec.blocks):
            raise ValueError(f"masks has {len(masks)} entries; the network has {len(spec.blocks)} blocks")
        dtype = jnp.dtype(self.config.dtype)
        tau = jnp.asarray(tau, jnp.float32)

        stem = spec.stem[0]
        pad = stem.kernel // 2
        x = nn.Conv(
            stem.out_channels,
            (stem.kernel, stem.kernel),
            strides=(2, 2),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=conv_init,
            dtype=dtype,
            name="stem_conv",
        )(images.astype(dtype))
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        if len(spec.stem) > 1:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        block_cls = DynamicBottleneck if spec.blocks[0].kind == "bottleneck" else DynamicBasicBlock
        records = []
        for i, block in enumerate(spec.blocks):
            x, record = block_cls(
                block, dtype=dtype, zero_init_residual=self.config.zero_init_residual, name=block.name
            )(
                x,
                train=train,
                tau=tau,
                gate_offset=gate_offset,
                forced=masks[i] if masks else None,
                noise=gumbel_noise,
            )
            records.append(record)

        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.config.num_classes, name="fc")(pooled)
        macs = spec.fixed_macs + sum(record["macs"] for record in records)
        aux = {
            "blocks": records,
            "macs": macs,
            "batch_macs": spec.fixed_macs + sum(record["batch_macs"] for record in records),
            "dense_macs": jnp.asarray(spec.dense_macs, jnp.float32),
        }
        return logits, aux
