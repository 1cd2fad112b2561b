"""CLIP score: how well generated images match their prompts (Hessel et al. 2021, "CLIPScore").

Per pair, 100 * max(cos(E_I(image), E_T(prompt)), 0) with CLIP's image and text embeddings; the metric is the
mean over pairs. Hessel et al. write w * max(cos, 0) with w = 2.5 for captioning; text-to-image papers (and
torchmetrics' CLIPScore) use w = 100, as here. Scores are comparable only for the same CLIP model (arch and
weights, recorded in `describe()`), and open_clip's ViT-L/14 `openai` weights are the common choice.

Images reach CLIP like every extractor's (uint8, PIL bicubic resize to its input size, ldm.metrics.extractors);
prompts go through the model's own tokenizer (cut at its context length, 77 tokens for OpenAI CLIP).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ldm.metrics.extractors import load_open_clip, normalise, resize_uint8

CLIP_SCORE_WEIGHT = 100.0


def clip_scores(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """(N,) scores 100 * max(cos(image_i, text_i), 0) of paired embeddings (N, D) (Hessel et al. 2021, eq. 1
    with w = 100); the embeddings need not be normalised."""
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.ndim != 2:
        raise ValueError(f"CLIP score pairs images with prompts one to one: got image embeddings "
                         f"{tuple(image_embeddings.shape)} and text embeddings {tuple(text_embeddings.shape)}.")
    cosine = torch.nn.functional.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1)
    return CLIP_SCORE_WEIGHT * cosine.clamp(min=0)


class CLIPScore(nn.Module):
    """`scorer(images, prompts)` -> (N,) CLIP scores of uint8 images (N, 3, H, W) against their prompts.

    `model` is anything with open_clip's `encode_image(pixels)` / `encode_text(tokens)`; `tokenizer(prompts)`
    gives its (N, L) token ids; `mean` / `std` standardise [0, 1] pixels for its image tower."""

    def __init__(self, model: nn.Module, tokenizer: Callable[[Sequence[str]], Tensor], input_size: int,
                 mean: Sequence[float], std: Sequence[float], identity: dict[str, Any]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.input_size = tokenizer, int(input_size)
        self.mean, self.std, self.identity = tuple(mean), tuple(std), dict(identity)

    @torch.inference_mode()
    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score needs one prompt per image: got {len(prompts)} prompts for "
                             f"{len(images)} images.")
        device = next(self.model.parameters()).device
        pixels = normalise(resize_uint8(images, self.input_size).to(device), self.mean, self.std)
        tokens = self.tokenizer(list(prompts)).to(device)
        return clip_scores(self.model.encode_image(pixels), self.model.encode_text(tokens)).cpu()

    def describe(self) -> dict[str, Any]:
        return {"implementation": "open_clip", **self.identity, "input_size": self.input_size,
                "formula": "100 * max(cos(image, text), 0), mean over pairs (Hessel et al. 2021)"}


def build_clip_score(arch: str = "ViT-L-14", pretrained: str = "openai",
                     device: str | torch.device = "cpu") -> CLIPScore:
    """The scorer of an open_clip model: `pretrained` a tag (downloaded from the hub into its cache) or a local
    state dict. Offline without the weights it fails at once (WeightsUnavailableError) naming the file to place
    and `clip_score.pretrained=`."""
    import open_clip

    model, weights = load_open_clip(arch, pretrained, device, option="clip_score")
    size = model.visual.image_size
    config = getattr(model.visual, "preprocess_cfg", {}) or {}
    return CLIPScore(model, open_clip.get_tokenizer(arch), size[0] if isinstance(size, (tuple, list)) else size,
                     config.get("mean", open_clip.OPENAI_DATASET_MEAN), config.get("std", open_clip.OPENAI_DATASET_STD),
                     {"arch": arch, "pretrained": weights})


def clip_score_metrics(scores: Tensor, scorer: CLIPScore) -> dict[str, Any]:
    """metrics.json entries: the mean, its standard deviation over pairs, and the CLIP model that scored."""
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()) if len(scores) > 1 else None,
            "clip_score_model": scorer.describe()}
