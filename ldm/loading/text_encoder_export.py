"""The text encoder of a diffusers export: a frozen CLIP text tower as transformers' `CLIPTextModel` + `CLIPTokenizer`.

Our `FrozenOpenCLIP` conditioner holds an open_clip text tower: OpenAI CLIP ViT-L/14 for SD 1.x (whose release
file stores it in the transformers layout, `cond_stage_model.transformer.text_model.*`, loaded into open_clip on
the way in), OpenCLIP ViT-H/14 for SD 2.x. Both are the same pre-LayerNorm causal transformer as
`CLIPTextModel`, so the export is a rename plus the split of open_clip's fused `in_proj` into q / k / v:

  token_embedding, positional_embedding   -> embeddings.token_embedding, embeddings.position_embedding
  resblocks.i.ln_1 / ln_2                 -> encoder.layers.i.layer_norm1 / layer_norm2
  resblocks.i.attn.in_proj (3d x d)       -> self_attn.q_proj, k_proj, v_proj (rows 0:d, d:2d, 2d:3d)
  resblocks.i.attn.out_proj, mlp.c_fc, mlp.c_proj -> self_attn.out_proj, mlp.fc1, mlp.fc2
  ln_final                                -> final_layer_norm

diffusers' pipelines use `last_hidden_state` (after `final_layer_norm`): SD 2.x's penultimate-layer tokens are
therefore a tower with its last block left out (num_hidden_layers = layers - 1), as in the 2.x release's own
text_encoder. The tokenizer files (vocab.json, merges.txt) are written from open_clip's BPE table, which ships
inside the open_clip package: nothing is downloaded. Its padding token is the conditioner's (`pad_token_id`:
end-of-text for SD 1.x, id 0 = "!" for SD 2.x, as their releases; like the SD 2.x release's, that tokenizer then
reads a "!" in a prompt as the padding token, id 0, where open_clip's BPE gives "!</w>", 256).

Other conditioners (our from-scratch `TextTransformer`: pre-LayerNorm but bidirectional, without CLIP's causal
mask) have no transformers class and are not written (`text_encoder_exportable` says why).
"""
from __future__ import annotations

import json
import os
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

LAYER_RENAMES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                 "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2.", "attn.in_proj_": None}
UNUSED = ("text_projection", "logit_scale", "logit_bias", "attn_mask")  # CLIPTextModel has no projection head


def text_encoder_exportable(conditioner: nn.Module) -> bool:
    return type(conditioner).__name__ == "FrozenOpenCLIP"


def clip_text_config(conditioner: nn.Module) -> dict[str, Any]:
    """`CLIPTextConfig` arguments of the conditioner's tower, cut at the layer the conditioner reads."""
    tower = conditioner.tower
    blocks = tower.transformer.resblocks
    first = blocks[0]
    width = tower.token_embedding.embedding_dim
    quick_gelu = type(first.mlp.gelu).__name__ == "QuickGELU"  # OpenAI CLIP: x * sigmoid(1.702 x)
    return {
        "_name_or_path": "ldm export",
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": tower.token_embedding.num_embeddings,
        "hidden_size": width,
        "intermediate_size": first.mlp.c_fc.out_features,
        "projection_dim": int(tower.text_projection.shape[1]) if getattr(tower, "text_projection", None) is not None
        else width,
        "num_hidden_layers": len(blocks) - (1 if conditioner.layer == "penultimate" else 0),
        "num_attention_heads": first.attn.num_heads,
        "max_position_embeddings": tower.positional_embedding.shape[0],
        "hidden_act": "quick_gelu" if quick_gelu else "gelu",
        "layer_norm_eps": first.ln_1.eps,
        "bos_token_id": conditioner.tokenizer.sot_token_id,
        "eos_token_id": conditioner.eot_token_id,
        "pad_token_id": conditioner.pad_token_id if conditioner.pad_token_id is not None else 0,
        "torch_dtype": "float32",
    }


def clip_text_weights(conditioner: nn.Module, num_layers: int) -> dict[str, Tensor]:
    """The tower's tensors under CLIPTextModel's names (the table in the module docstring); a tensor that no
    rule covers is an error, never dropped."""
    out, unmatched = {}, []
    for key, value in conditioner.tower.state_dict().items():
        if key.split(".")[0] in UNUSED:
            continue
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final."):]] = value
        elif key.startswith("transformer.resblocks."):
            index, rest = key[len("transformer.resblocks."):].split(".", 1)
            if int(index) >= num_layers:
                continue  # SD 2.x reads the penultimate block: the last one is not part of the export
            prefix = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            rule = next((ours for ours in LAYER_RENAMES if rest.startswith(ours) and LAYER_RENAMES[ours]), None)
            if rule is None:
                unmatched.append(key)
            else:
                out[prefix + LAYER_RENAMES[rule] + rest[len(rule):]] = value
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"No CLIPTextModel name for {len(unmatched)} text-tower tensors, e.g. {unmatched[:5]}: this "
                         "open_clip tower has layers transformers' CLIP lacks. Use format=safetensors.")
    return {key: value.detach().contiguous().float() for key, value in out.items()}


def write_clip_text_encoder(conditioner: nn.Module, out_dir: str) -> None:
    """`out_dir/text_encoder/` (config.json, model.safetensors) and `out_dir/tokenizer/`."""
    config = clip_text_config(conditioner)
    folder = os.path.join(out_dir, "text_encoder")
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "config.json"), config)
    save_file(clip_text_weights(conditioner, config["num_hidden_layers"]), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    write_clip_tokenizer(conditioner, os.path.join(out_dir, "tokenizer"))


def write_clip_tokenizer(conditioner: nn.Module, folder: str) -> None:
    """vocab.json, merges.txt and the tokenizer configs of CLIPTokenizer, from open_clip's own BPE tables
    (the same 49,408-entry vocabulary and merge ranks as OpenAI's CLIP tokenizer)."""
    tokenizer = conditioner.tokenizer
    os.makedirs(folder, exist_ok=True)
    _write_json(os.path.join(folder, "vocab.json"), dict(sorted(tokenizer.encoder.items(), key=lambda item: item[1])))
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    pad_id = conditioner.pad_token_id if conditioner.pad_token_id is not None else 0
    special = {"bos_token": tokenizer.decoder[tokenizer.sot_token_id],
               "eos_token": tokenizer.decoder[conditioner.eot_token_id],
               "unk_token": tokenizer.decoder[conditioner.eot_token_id], "pad_token": tokenizer.decoder[pad_id]}
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)
    _write_json(os.path.join(folder, "tokenizer_config.json"),
                {"tokenizer_class": "CLIPTokenizer", "model_max_length": conditioner.context_length,
                 "do_lower_case": True, "errors": "replace", **special})


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")

