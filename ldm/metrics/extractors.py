"""Feature extractors for FID-style metrics, behind one small interface.

An extractor maps uint8 images (B, 3, H, W) to float features (B, dim) and describes itself
(`describe()`) so that metrics.json and the reference-statistics cache record exactly which features
were compared. Images reach every extractor the way clean-fid recommends (Parmar et al. 2022):
generated images are first quantised to uint8 (as if saved to PNG, `images_to_uint8`), then resized
to the extractor's input size with PIL's antialiased bicubic filter (`resize_uint8`).

Pretrained weights are never fetched at import. Offline (`LDM_OFFLINE=1` or `HF_HUB_OFFLINE=1`, ldm/utils/downloads.py),
a missing weight file raises `WeightsUnavailableError` at once, naming the file to place or the
option to pass; online, a failed download raises the same error.
"""
from __future__ import annotations

import hashlib
import os
from importlib import import_module
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from ldm.utils.downloads import downloads_allowed
from ldm.utils.files import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
)
from ldm.utils.images import images_to_uint8  # noqa: F401  (re-exported: part of the metrics API)

RESIZE_DESCRIPTION = "uint8 quantisation, then PIL bicubic (antialiased) resize to the input size (clean-fid)"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@runtime_checkable
class FeatureExtractor(Protocol):
    """What metrics need from an extractor."""

    name: str
    layer: str
    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...

    def metric_names(self) -> tuple[str, str | None]:
        """How its Fréchet distance and (with a classifier head) its Inception Score are reported."""
        ...

    def class_log_probabilities(self, features: torch.Tensor) -> torch.Tensor | None:
        """Class logits from its own features where the network has a classifier head (for IS), else None."""
        ...

    def prompt_fidelity(self, features: torch.Tensor, captions: Sequence[str]) -> dict[str, float] | None:
        """How often the images its features came from match their captions, where it can judge that; else None."""
        ...


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says what to provide."""


def build_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build a registered extractor by name (`inception_v3`, `clip`, `dinov2`, `shapes_cnn`)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; choose one of {sorted(EXTRACTORS)}.")
    module_name, attribute = EXTRACTORS[name]
    factory: Callable[..., FeatureExtractor] = getattr(import_module(module_name), attribute)
    return factory(**kwargs)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased PIL bicubic resize of uint8 (B, 3, H, W) images to (B, 3, size, size)."""
    check_uint8_images(images)
    if images.shape[-2:] == (size, size):
        return images
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    resized = [np.asarray(Image.fromarray(array).resize((size, size), Image.BICUBIC)) for array in arrays]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(images.device)


def check_uint8_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        found = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"feature extractors take uint8 images of shape (B, 3, H, W), got {found}; "
            "convert images in [-1, 1] with ldm.metrics.images_to_uint8."
        )


def file_digest(path: str, length: int = 16) -> str:
    """Short sha256 of a file, so that a cache keyed on describe() notices changed weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


class ResizingExtractor(nn.Module):
    """Shared plumbing: check input, resize to `input_size` with PIL bicubic, embed without grad."""

    name: str
    layer: str
    dim: int
    input_size: int
    fid_name: str | None = None  # None: reported as FD_<name>, never as an Inception FID
    is_name: str | None = None   # set where class_log_probabilities gives logits

    def metric_names(self) -> tuple[str, str | None]:
        return self.fid_name or f"FD_{self.name}", self.is_name

    def class_log_probabilities(self, features: torch.Tensor) -> torch.Tensor | None:
        return None

    def prompt_fidelity(self, features: torch.Tensor, captions: Sequence[str]) -> dict[str, float] | None:
        return None

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.embed(resize_uint8(images, self.input_size).to(device)).float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, input_size, input_size) uint8 on the extractor's device -> (B, dim) features."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "dim": self.dim,
            "input_size": self.input_size,
            "preprocessing": RESIZE_DESCRIPTION,
            **self.weights_identity(),
        }

    def weights_identity(self) -> dict[str, Any]:
        raise NotImplementedError


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images -> float, standardised with per-channel mean / std given for [0, 1] pixels."""
    mean_tensor = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_tensor = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_tensor) / std_tensor


class InceptionV3Features(ResizingExtractor):
    """Inception-v3 pool3 features (2048-d), the FID standard (Heusel et al. 2017), via torch-fidelity's
    port of the TF-FID graph, `FeatureExtractorInceptionV3`; same weights as pytorch-fid / clean-fid."""

    WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
    name, layer, dim, input_size = "inception_v3", "pool_2048", 2048, 299
    fid_name, is_name = "FID", "IS"

    def __init__(self, weights_path: str | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (
            URL_INCEPTION_V3,
            FeatureExtractorInceptionV3,
        )

        self.weights_path = _local_or_cached_weights(weights_path, self.WEIGHTS_FILE, URL_INCEPTION_V3)
        # torch-fidelity loads with weights_only=False: refuse anything that is not a plain state dict first.
        _load_weights_file(self.weights_path, f"the released {self.WEIGHTS_FILE} (from {URL_INCEPTION_V3})")
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], self.weights_path).to(device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # Already 299 px: torch-fidelity's TF-style bilinear resize is then the identity.
        (features,) = self.network(images)
        return features

    def class_log_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """torch-fidelity's `logits_unbiased`: pool features times the fc weight, no bias (the logits its IS uses)."""
        return features @ self.network.fc.weight.detach().cpu().T

    def weights_identity(self) -> dict[str, Any]:
        # The release file name carries its hash; any other file is identified by its content.
        is_release_file = os.path.basename(self.weights_path) == self.WEIGHTS_FILE
        weights = self.WEIGHTS_FILE if is_release_file else file_digest(self.weights_path)
        return {"implementation": "torch-fidelity FeatureExtractorInceptionV3", "weights": weights}


class CLIPFeatures(ResizingExtractor):
    """CLIP image embeddings (open_clip `visual` output, not L2-normalised, as torch-fidelity), the
    features of FID_CLIP (Kynkäänniemi et al. 2023, "The Role of ImageNet Classes in FID")."""

    name, layer, fid_name = "clip", "image_embedding", "FID_CLIP"

    def __init__(self, arch: str = "ViT-B-32", pretrained: str = "openai", device: str | torch.device = "cpu") -> None:
        super().__init__()
        import open_clip

        model, identity = load_open_clip(arch, pretrained, device, option="features")
        self.visual = model.visual.eval().requires_grad_(False)
        self.arch, self.pretrained = arch, identity
        self.dim = int(self.visual.output_dim)
        size = self.visual.image_size
        self.input_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        config = getattr(self.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(config.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(config.get("std", open_clip.OPENAI_DATASET_STD))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(normalise(images, self.mean, self.std))

    def weights_identity(self) -> dict[str, Any]:
        return {"implementation": "open_clip", "arch": self.arch, "pretrained": self.pretrained}


class DINOv2Features(ResizingExtractor):
    """DINOv2 CLS-token features (Oquab et al. 2023), used for FD_DINOv2 (Stein et al. 2023), from
    torch.hub `facebookresearch/dinov2` or a local clone (`repo_dir`) and weight file (`weights_path`)."""

    DIMS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}
    name, layer, input_size, fid_name = "dinov2", "cls_token", 224, "FD_DINOv2"

    def __init__(
        self,
        model: str = "dinov2_vitl14",
        weights_path: str | None = None,
        repo_dir: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if model not in self.DIMS:
            raise ValueError(f"unknown DINOv2 model {model!r}; choose one of {sorted(self.DIMS)}.")
        self.model_name, self.dim = model, self.DIMS[model]
        hub_dir = torch.hub.get_dir()
        repo_dir = repo_dir or os.path.join(hub_dir, "facebookresearch_dinov2_main")
        cached_weights = os.path.join(hub_dir, "checkpoints", f"{model}_pretrain.pth")
        missing = [path for path in (repo_dir, weights_path or cached_weights) if not os.path.exists(path)]
        if missing and not downloads_allowed():
            raise WeightsUnavailableError(_dinov2_hint(model, missing, "downloads are disabled (offline)"))
        try:
            source = ("local", repo_dir) if os.path.isdir(repo_dir) else ("github", "facebookresearch/dinov2")
            kwargs = {"trust_repo": True} if source[0] == "github" else {}
            network = torch.hub.load(source[1], model, source=source[0], pretrained=weights_path is None, **kwargs)
        except Exception as error:  # torch.hub raises URLError, HTTPError, RuntimeError, ... offline
            raise WeightsUnavailableError(_dinov2_hint(model, missing, f"{type(error).__name__}: {error}")) from error
        if weights_path is not None:
            network.load_state_dict(_load_weights_file(weights_path, f"the released DINOv2 {model} weights"))
        self.network = network.eval().requires_grad_(False).to(device)
        self.weights = file_digest(weights_path) if weights_path else f"{model}_pretrain.pth"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(normalise(images, IMAGENET_MEAN, IMAGENET_STD))

    def weights_identity(self) -> dict[str, Any]:
        return {"implementation": "torch.hub facebookresearch/dinov2", "model": self.model_name, "weights": self.weights}


EXTRACTORS: dict[str, tuple[str, str]] = {
    "inception_v3": (__name__, "InceptionV3Features"),
    "clip": (__name__, "CLIPFeatures"),
    "dinov2": (__name__, "DINOv2Features"),
    "shapes_cnn": ("ldm.metrics.shapes_classifier", "load_shapes_classifier_extractor"),
}


def _local_or_cached_weights(weights_path: str | None, file_name: str, url: str) -> str:
    """The given file, else `$TORCH_HOME/hub/checkpoints/<file_name>`, downloaded there if allowed."""
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"features.weights_path={weights_path!r} does not exist.")
        return weights_path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if os.path.isfile(cached):
        return cached
    hint = (
        f"place {file_name} (from {url}) at {cached} (the directory follows $TORCH_HOME), "
        f"or pass features.weights_path=/path/to/{file_name}"
    )
    if not downloads_allowed():
        raise WeightsUnavailableError(f"{file_name} is not on disk and downloads are disabled (offline): {hint}.")
    try:
        torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except Exception as error:  # URLError, HTTPError, timeouts, partial files ...
        raise WeightsUnavailableError(f"downloading {file_name} failed ({error}): {hint}.") from error
    return cached


def _load_weights_file(path: str, release: str) -> dict[str, Any]:
    """A weights file's state dict, loaded without running code; a file that is not one (code-carrying
    pickle, truncated download, another format) is refused, naming it and the file to put there instead."""
    try:
        return load_checkpoint(path)
    except (UnsafeCheckpointError, CorruptCheckpointError) as error:
        raise WeightsUnavailableError(
            f"{error} Replace {path} with {release}, or pass features.weights_path=/path/to/a/good/copy.") from None


def load_open_clip(arch: str, pretrained: str, device: str | torch.device = "cpu",
                   option: str = "features") -> tuple[nn.Module, str]:
    """An open_clip model (both towers) and the identity of its weights (the tag, or a local file's digest):
    `pretrained` is an open_clip tag (e.g. `openai`, from the Hugging Face hub or its cache) or a local state
    dict. Offline without the file, or on a failed download, WeightsUnavailableError names the file to place
    and `<option>.pretrained=`, the key to set."""
    import open_clip

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {option}.arch={arch!r}; see open_clip.list_models().")
    if not pretrained:
        raise ValueError(f"{option}.pretrained is empty: CLIP needs pretrained weights, a tag (e.g. 'openai') or "
                         "a local file.")
    is_file = os.path.isfile(pretrained)
    if not is_file and not downloads_allowed():
        raise WeightsUnavailableError(_clip_hint(arch, pretrained, "downloads are disabled (offline)", option))
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, device=device)
    except Exception as error:  # open_clip / huggingface_hub raise many types for a missing file
        raise WeightsUnavailableError(_clip_hint(arch, pretrained, f"{type(error).__name__}: {error}",
                                                 option)) from error
    return model.eval().requires_grad_(False), file_digest(pretrained) if is_file else pretrained


def _clip_hint(arch: str, pretrained: str, reason: str, option: str = "features") -> str:
    import open_clip

    config = open_clip.get_pretrained_cfg(arch, pretrained)
    hub = config.get("hf_hub")
    source = (f"https://huggingface.co/{hub.rstrip('/')}/blob/main/open_clip_model.safetensors" if hub
              else config.get("url") or "its release URL")
    return (
        f"cannot load CLIP weights {arch}/{pretrained} ({reason}). Fetch {source} into the Hugging Face cache "
        f"($HF_HOME) with network access once, or place that file and pass it: "
        f"{option}.pretrained=/path/to/open_clip_model.safetensors ({option}.arch={arch})."
    )


def _dinov2_hint(model: str, missing: list[str], reason: str) -> str:
    return (
        f"cannot load DINOv2 {model} ({reason}); missing: {', '.join(missing)}. Clone "
        f"github.com/facebookresearch/dinov2 to $TORCH_HOME/hub/facebookresearch_dinov2_main (or pass "
        f"features.repo_dir=...) and place {model}_pretrain.pth in $TORCH_HOME/hub/checkpoints/ (or pass "
        f"features.weights_path=...)."
    )
