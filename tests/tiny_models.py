"""The tiny text-to-image LatentDiffusion the unit tests build (seconds on a CPU): one definition, so a change of
constructor arguments is made once."""
from __future__ import annotations

import copy
from typing import Any

TINY_TEXT_LDM: dict[str, Any] = dict(
    unet=dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
              attention_resolutions=[2], num_head_channels=8, context_dim=32, norm_groups=8),
    conditioner={"_target_": "ldm.models.conditioners.TextTransformer", "width": 32, "layers": 1, "heads": 2},
    first_stage=dict(embed_dim=4, z_channels=4, ch=16, ch_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                     norm_groups=8),
    image_size=16, scale_factor=0.5, ema_decay=0.0,
)


def tiny_text_ldm(**overrides: Any) -> dict[str, Any]:
    """LatentDiffusion keyword arguments: the tiny model with `overrides` (a fresh copy each call)."""
    return {**copy.deepcopy(TINY_TEXT_LDM), **overrides}
