"""Write a LatentDiffusion as a diffusers Stable-Diffusion-style folder (unet/, vae/, scheduler/).

diffusers names modules by role (`down_blocks.L.resnets.j`), CompVis (= us) by position
(`input_blocks.N.M`), so the conversion is a table of module-prefix pairs built from the
architecture: every one of our keys is renamed by its longest matching prefix, and a key no pair
covers is an error, never dropped. The folder loads with `UNet2DConditionModel.from_pretrained(DIR,
subfolder="unet")`, `AutoencoderKL.from_pretrained(DIR, subfolder="vae")` and
`DDIMScheduler.from_pretrained(DIR, subfolder="scheduler")` (or the scheduler class of the export's
sampler, with its timestep grid: the `SamplerSettings` given to `export_diffusers`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from safetensors.torch import save_file
from torch import Tensor

from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.settings import SamplerSettings
from ldm.loading.exported import model_weights
from ldm.loading.state_dicts import strip_prefix
from ldm.loading.text_encoder_export import (
    text_encoder_exportable,
    write_clip_text_encoder,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}
SCHEDULERS = {  # our sampler -> the diffusers scheduler with the same update rule, and its settings for it
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small", "clip_sample": False}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
UNET_RESNET = {"in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
               "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut."}
VAE_RESNET = {"nin_shortcut.": "conv_shortcut."}
VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def export_diffusers(model, out_dir: str, use_ema: bool = True, sampling: SamplerSettings | None = None) -> list[str]:
    """Write `model` (a LatentDiffusion) to `out_dir`; returns the parts that were not exported
    (also listed in `out_dir/README.md`), e.g. a text encoder diffusers has no class for. The scheduler is
    the one of `sampling` (SamplerSettings; None: its defaults, DDIM with SD's "leading" grid)."""
    settings = SamplerSettings.of(sampling)
    unet_cfg, vae_cfg = dict(model.hparams["unet"]), dict(model.hparams["first_stage"])
    unet_cfg.update(in_channels=model.unet.in_channels, out_channels=model.unet.out_channels)  # derived, maybe null
    _check_exportable(unet_cfg, vae_cfg)
    diffusers_version = _diffusers_version()  # before anything is written: needs the diffusers package
    weights = model_weights(model, use_ema)
    factor = model.first_stage.downsampling_factor
    components = {
        "unet": (diffusers_unet_config(unet_cfg, model.hparams["image_size"] // factor,
                                       upcast_attention=bool(unet_cfg.get("use_linear_in_transformer"))),
                 unet_to_diffusers(strip_prefix(weights, "unet."), unet_cfg)),
        "vae": (diffusers_vae_config(vae_cfg, model.hparams["image_size"], float(model.scale_factor)),
                vae_to_diffusers(strip_prefix(weights, "first_stage."), vae_cfg)),
    }
    for name, (config, state) in components.items():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        _write_json(os.path.join(out_dir, name, "config.json"), config)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, name, WEIGHTS_NAME),
                  metadata={"format": "pt"})
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    scheduler = diffusers_scheduler_config(model.schedule, model.hparams["prediction_type"], settings)
    _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), scheduler)
    with_text = text_encoder_exportable(model.conditioner)
    if with_text:
        write_clip_text_encoder(model.conditioner, out_dir)
    _write_json(os.path.join(out_dir, "model_index.json"),
                _model_index(scheduler["_class_name"], diffusers_version, with_text))
    not_exported = _not_exported(model.conditioner)
    _write_readme(out_dir, not_exported, use_ema)
    return not_exported


# ---------------------------------------------------------------- configs
def diffusers_unet_config(unet: Mapping[str, Any], sample_size: int, upcast_attention: bool = False) -> dict[str, Any]:
    """UNet2DConditionModel arguments. Its `attention_head_dim` is, for historical reasons, the
    number of heads per level (diffusers' own SD 2 configs list [5, 10, 20, 20] there). `upcast_attention`:
    SD 2.x (linear proj_in / proj_out, `use_linear_in_transformer`) computes attention scores in fp32, and its
    release configs say so (its fp16 attention overflows without)."""
    widths = [unet["model_channels"] * mult for mult in unet["channel_mult"]]
    attention = [2**level in unet["attention_resolutions"] for level in range(len(widths))]
    heads = [unet.get("num_heads", -1) if unet.get("num_heads", -1) != -1 else w // unet["num_head_channels"]
             for w in widths]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": unet["num_res_blocks"],
        "transformer_layers_per_block": unet.get("transformer_depth", 1),
        "cross_attention_dim": unet["context_dim"],
        "attention_head_dim": heads,
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "resnet_time_scale_shift": "scale_shift" if unet.get("use_scale_shift_norm") else "default",
        "norm_num_groups": unet.get("norm_groups", 32),
        "norm_eps": 1e-5,
        "dropout": unet.get("dropout", 0.0),
        "flip_sin_to_cos": True,  # CompVis embeds [cos, sin]
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "upcast_attention": upcast_attention,
    }


def diffusers_vae_config(vae: Mapping[str, Any], image_size: int, scale_factor: float) -> dict[str, Any]:
    levels = len(vae["ch_mult"])
    attention = [2**level in vae.get("attention_resolutions", ()) for level in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": vae.get("in_channels", 3),
        "out_channels": vae.get("out_channels", 3),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        "block_out_channels": [vae["ch"] * mult for mult in vae["ch_mult"]],
        "layers_per_block": vae["num_res_blocks"],
        "latent_channels": vae["z_channels"],
        "norm_num_groups": vae.get("norm_groups", 32),
        "act_fn": "silu",
        "sample_size": image_size,
        "scaling_factor": scale_factor,
        "force_upcast": True,
    }


def diffusers_scheduler_config(schedule: NoiseSchedule, prediction_type: str,
                               settings: SamplerSettings = SamplerSettings()) -> dict[str, Any]:
    """The diffusers scheduler that reproduces our schedule (zero-terminal-SNR rescaling included) and the
    sampler of `settings` with its grid (ldm/diffusion/samplers.py: no x0 clipping; DDIM's last step to
    alpha_bar_0). Guidance scale and rescale are pipeline arguments in diffusers, not scheduler settings."""
    beta_schedule = schedule.beta_schedule
    if beta_schedule not in BETA_SCHEDULES or prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"No diffusers equivalent for beta_schedule={beta_schedule!r} / prediction_type={prediction_type!r}.")
    if beta_schedule == "cosine" and schedule.cosine_s != 8e-3:
        raise ValueError("diffusers' cosine schedule (squaredcos_cap_v2) has s = 0.008; this model uses another cosine_s.")
    class_name, specific = SCHEDULERS[settings.sampler]
    endpoints = {"beta_start": schedule.linear_start, "beta_end": schedule.linear_end} if beta_schedule != "cosine" else {}
    return {
        "_class_name": class_name,
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": BETA_SCHEDULES[beta_schedule],
        **endpoints,
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "prediction_type": PREDICTION_TYPES[prediction_type],
        "timestep_spacing": settings.timestep_spacing,
        "steps_offset": settings.steps_offset,
        **specific,
    }


# ---------------------------------------------------------------- weights
def unet_to_diffusers(state: Mapping[str, Tensor], unet: Mapping[str, Any]) -> dict[str, Tensor]:
    return _rename(state, _unet_prefixes(len(unet["channel_mult"]), unet["num_res_blocks"]), "UNet")


def vae_to_diffusers(state: Mapping[str, Tensor], vae: Mapping[str, Any]) -> dict[str, Tensor]:
    """Renamed autoencoder tensors; attention q/k/v/proj_out go from 1x1 convs to Linear weights."""
    renamed = _rename(state, _vae_prefixes(len(vae["ch_mult"]), vae["num_res_blocks"]), "autoencoder")
    return {key: value[:, :, 0, 0] if ".attentions." in key and value.ndim == 4 else value
            for key, value in renamed.items()}


def _unet_prefixes(levels: int, blocks: int) -> dict[str, str]:
    pairs = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for level in range(levels):
        for j in range(blocks):
            n = 1 + level * (blocks + 1) + j
            pairs |= _resnet(f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", UNET_RESNET)
            pairs[f"input_blocks.{n}.1."] = f"down_blocks.{level}.attentions.{j}."
        if level < levels - 1:
            pairs[f"input_blocks.{(level + 1) * (blocks + 1)}.0.op."] = f"down_blocks.{level}.downsamplers.0.conv."
    pairs |= _resnet("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET)
    pairs["middle_block.1."] = "mid_block.attentions.0."
    pairs |= _resnet("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET)
    for up in range(levels):  # output_blocks run from the lowest resolution up, as diffusers' up_blocks
        for j in range(blocks + 1):
            n = up * (blocks + 1) + j
            pairs |= _resnet(f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", UNET_RESNET)
            pairs[f"output_blocks.{n}.1."] = f"up_blocks.{up}.attentions.{j}."
        last = up * (blocks + 1) + blocks  # the upsampler ends the level's last block: index 1 or 2
        for index in (1, 2):
            pairs[f"output_blocks.{last}.{index}.conv."] = f"up_blocks.{up}.upsamplers.0.conv."
    return pairs


def _vae_prefixes(levels: int, blocks: int) -> dict[str, str]:
    pairs = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        pairs |= {f"{side}.conv_in.": f"{side}.conv_in.", f"{side}.conv_out.": f"{side}.conv_out.",
                  f"{side}.norm_out.": f"{side}.conv_norm_out."}
        pairs |= _resnet(f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.", VAE_RESNET)
        pairs |= _resnet(f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", VAE_ATTENTION)
        pairs |= _resnet(f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.", VAE_RESNET)
    for level in range(levels):
        for j in range(blocks):
            pairs |= _resnet(f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.", VAE_RESNET)
            pairs |= _resnet(f"encoder.down.{level}.attn.{j}.", f"encoder.down_blocks.{level}.attentions.{j}.", VAE_ATTENTION)
        pairs[f"encoder.down.{level}.downsample.conv."] = f"encoder.down_blocks.{level}.downsamplers.0.conv."
        up = levels - 1 - level  # decoder.up is indexed by resolution; diffusers' up_blocks by execution order
        for j in range(blocks + 1):
            pairs |= _resnet(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", VAE_RESNET)
            pairs |= _resnet(f"decoder.up.{level}.attn.{j}.", f"decoder.up_blocks.{up}.attentions.{j}.", VAE_ATTENTION)
        pairs[f"decoder.up.{level}.upsample.conv."] = f"decoder.up_blocks.{up}.upsamplers.0.conv."
    return pairs


def _resnet(ours: str, theirs: str, inner: Mapping[str, str]) -> dict[str, str]:
    """The block's own prefix pair plus its renamed sub-layers (longer, so they win)."""
    return {ours: theirs} | {ours + a: theirs + b for a, b in inner.items()}


def _rename(state: Mapping[str, Tensor], prefixes: Mapping[str, str], what: str) -> dict[str, Tensor]:
    by_length = sorted(prefixes, key=len, reverse=True)
    renamed, unmatched = {}, []
    for key, value in state.items():
        prefix = next((p for p in by_length if key.startswith(p)), None)
        if prefix is None:
            unmatched.append(key)
        else:
            renamed[prefixes[prefix] + key[len(prefix):]] = value
    if unmatched:
        raise ValueError(f"No diffusers name for {len(unmatched)} {what} tensors, e.g. {unmatched[:5]}.")
    return renamed


# ---------------------------------------------------------------- folder files
def _check_exportable(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> None:
    if unet.get("spatial_positional_embedding"):
        raise ValueError("this UNet adds 2-D positional embeddings in its transformers "
                         "(unet.spatial_positional_embedding), which diffusers' UNet2DConditionModel has no option for. "
                         "Use format=safetensors.")
    if unet.get("context_dim") is None or unet.get("class_embed_dim") is not None:
        raise ValueError(
            "diffusers export supports text-conditioned models (cross-attention UNet, no class embedding); this "
            "UNet has context_dim=None or a class embedding. Use format=safetensors."
        )
    if vae["embed_dim"] != vae["z_channels"]:
        raise ValueError(f"diffusers' AutoencoderKL needs embed_dim == z_channels; this first stage has "
                         f"{vae['embed_dim']} and {vae['z_channels']}. Use format=safetensors.")


def _not_exported(conditioner) -> list[str]:
    """diffusers represents text encoders as transformers models; ours (open_clip towers, the
    from-scratch TextTransformer) have no faithful counterpart there, so they are named, not faked."""
    name = type(conditioner).__name__
    if name == "NullConditioner":
        return []
    if text_encoder_exportable(conditioner):  # written as text_encoder/ + tokenizer/ (text_encoder_export.py)
        return (["cross-attention padding mask (conditioner.padding_mask): pass the conditioner's context_mask "
                 "as the UNet's encoder_attention_mask; the pipelines do not"] if conditioner.padding_mask else [])
    details = {k: getattr(conditioner, k) for k in ("layer", "output_dim") if hasattr(conditioner, k)}
    items = [f"text_encoder / tokenizer: {name} {details} (no diffusers/transformers equivalent written; pass "
             "prompt_embeds computed with ldm's conditioner)"]
    if getattr(conditioner, "padding_mask", False):
        items.append("cross-attention padding mask (conditioner.padding_mask): pass the conditioner's context_mask "
                     "as the UNet's encoder_attention_mask; the pipelines do not")
    return items


def _diffusers_version() -> str:
    try:
        import diffusers
    except ImportError:
        raise ValueError("format=diffusers records the diffusers version in model_index.json: install the extra "
                         "with pip install -e '.[diffusers]' (make install includes it).") from None
    return diffusers.__version__


def _model_index(scheduler: str, diffusers_version: str, with_text: bool = False) -> dict[str, Any]:
    absent = [None, None]
    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers_version,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler],
            "text_encoder": ["transformers", "CLIPTextModel"] if with_text else absent,
            "tokenizer": ["transformers", "CLIPTokenizer"] if with_text else absent,
            "safety_checker": absent, "feature_extractor": absent, "requires_safety_checker": False}


def _write_readme(out_dir: str, not_exported: list[str], use_ema: bool) -> None:
    lines = ["# Exported by `python -m ldm.cli.export format=diffusers`", "",
             f"UNet weights: {'EMA' if use_ema else 'raw (not EMA)'}. Components: unet/, vae/, scheduler/"
             f"{', text_encoder/, tokenizer/' if not any(i.startswith('text_encoder') for i in not_exported) else ''}.",
             ""]
    lines += ["## Not exported", ""] + [f"- {item}" for item in not_exported or ["nothing"]]
    with open(os.path.join(out_dir, "README.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    _write_json(os.path.join(out_dir, "not_exported.json"), not_exported)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
