"""A small CNN for the built-in `shapes` data: the offline stand-in for pretrained extractors.

No pretrained network can be fetched offline, so the framework trains its own once: a CNN predicting
the colour (7), shape (3) and 3x3 grid position (9) of the object of a single-object `shapes` image, trained
on images rendered on the fly by `ldm.data.shapes.render_sample`, deterministic by seed, cached to a
safetensors file. It serves twice:

- as the feature extractor `shapes_cnn` (layer `penultimate`) for FID / precision / recall on shapes:
  these are *shapes-CNN* distances, comparable only with each other, never with Inception FID;
- as a prompt-fidelity judge, `prompt_fidelity(features, captions)`: how often the generated object has
  the colour, shape and position its caption asks for.

Reproduce the cached file with
    python -m ldm.metrics.shapes_classifier --out PATH --resolution 64 --steps 400 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ldm.data.shapes import ATTRIBUTES, parse_caption_objects, render_sample
from ldm.metrics.extractors import (
    ResizingExtractor,
    file_digest,
)
from ldm.utils.files import write_atomic

HEADS: dict[str, tuple[str, ...]] = ATTRIBUTES
DEFAULT_STEPS = 400
DEFAULT_BATCH_SIZE = 64
LEARNING_RATE = 2e-3


class ShapesClassifier(nn.Module):
    """Four stride-2 conv blocks, a 3x3 adaptive pool (one cell per grid position, so position survives
    pooling at any resolution), a penultimate layer and one linear head per attribute."""

    def __init__(self, width: int = 32, feature_dim: int = 256) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.trunk = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(3), nn.Flatten())
        self.penultimate = nn.Sequential(nn.Linear(channels[-1] * 9, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({head: nn.Linear(feature_dim, len(names)) for head, names in HEADS.items()})
        self.width, self.feature_dim = width, feature_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Float images in [-1, 1] -> (penultimate features, logits per head)."""
        features = self.penultimate(self.trunk(images))
        return features, {head: layer(features) for head, layer in self.heads.items()}


def train_shapes_classifier(
    resolution: int = 64, steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
    width: int = 32, feature_dim: int = 256,
) -> ShapesClassifier:
    """Train on freshly rendered single-object images; the same arguments (and thread count) give the
    same weights."""
    torch.manual_seed(seed)
    model = ShapesClassifier(width, feature_dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=LEARNING_RATE, total_steps=max(steps, 2))
    rng = np.random.default_rng([seed, 0])
    model.train()
    for _ in range(steps):
        images, labels = render_batch(rng, batch_size, resolution)
        _, logits = model(to_model_input(images))
        loss = sum(F.cross_entropy(logits[head], labels[head]) for head in HEADS)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


@torch.inference_mode()
def heldout_accuracy(model: ShapesClassifier, resolution: int, num_samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Per-head accuracy on images rendered from a stream disjoint from training ([seed, 1])."""
    images, labels = render_batch(np.random.default_rng([seed, 1]), num_samples, resolution)
    _, logits = model.eval()(to_model_input(images))
    return {head: float((logits[head].argmax(dim=1) == labels[head]).double().mean()) for head in HEADS}


def render_batch(rng: np.random.Generator, batch_size: int, resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """uint8 (B, 3, R, R) images and the class index of each attribute of their (only) object."""
    arrays, labels = [], {head: [] for head in HEADS}
    for _ in range(batch_size):
        image, attributes = render_sample(rng, resolution)
        arrays.append(np.asarray(image))
        for head, names in HEADS.items():
            labels[head].append(names.index(attributes["objects"][0][head]))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, {head: torch.tensor(values) for head, values in labels.items()}


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def save_shapes_classifier(model: ShapesClassifier, path: str, resolution: int, **record: Any) -> None:
    """Atomic safetensors save; architecture, resolution and `record` (steps, seed, accuracy) as metadata."""
    metadata = {"resolution": resolution, "width": model.width, "feature_dim": model.feature_dim, **record}
    blob = safetensors_bytes(model.state_dict(), metadata={key: json.dumps(value) for key, value in metadata.items()})
    write_atomic(path, lambda file: file.write(blob))


def load_shapes_classifier(path: str) -> tuple[ShapesClassifier, dict[str, Any]]:
    """The classifier saved at `path` and its metadata."""
    with safe_open(path, framework="pt") as handle:
        metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if "resolution" not in metadata:
        raise ValueError(f"{path} is not a shapes classifier file (no metadata); retrain it with {_train_command(path)}")
    model = ShapesClassifier(metadata["width"], metadata["feature_dim"])
    model.load_state_dict(state)
    return model.eval(), metadata


class ShapesClassifierExtractor(ResizingExtractor):
    """The classifier as a feature extractor (penultimate features) and prompt-fidelity judge."""

    name, layer, fid_name, is_name = "shapes_cnn", "penultimate", "FID_shapes_cnn", "IS_shapes_cnn"

    def __init__(self, model: ShapesClassifier, resolution: int, weights: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim, self.input_size, self.weights = model.feature_dim, resolution, weights

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(to_model_input(images))[0]

    def weights_identity(self) -> dict[str, Any]:
        return {"implementation": "ldm.metrics.shapes_classifier", "weights": self.weights}

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted class index per head for uint8 (B, 3, H, W) images."""
        return {head: logits.argmax(dim=1) for head, logits in self.head_logits(self(images)).items()}

    @torch.inference_mode()
    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of the colour / shape / position heads (linear layers on the penultimate features), on the CPU."""
        device = next(self.parameters()).device
        return {name: head(features.to(device)).cpu() for name, head in self.model.heads.items()}

    def class_log_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Joint (colour, shape, position) log-probabilities, the heads taken as independent given the image,
        so IS_shapes_cnn peaks at 7*3*9 = 189."""
        color, shape, position = (logits.log_softmax(dim=1) for logits in self.head_logits(features).values())
        return (color[:, :, None, None] + shape[:, None, :, None] + position[:, None, None, :]).flatten(1)

    def prompt_fidelity(self, features: torch.Tensor, captions: Sequence[str]) -> dict[str, float]:
        """Fraction of images whose predicted colour / shape / position (and all three) match the caption."""
        predictions = {head: logits.argmax(dim=1) for head, logits in self.head_logits(features).items()}
        return caption_match_rates(predictions, captions)


def load_shapes_classifier_extractor(
    weights_path: str, resolution: int = 64, train_if_missing: bool = True, steps: int = DEFAULT_STEPS,
    seed: int = 0, device: str | torch.device = "cpu",
) -> ShapesClassifierExtractor:
    """The `shapes_cnn` extractor from `weights_path`, training and caching it there first if missing."""
    if not os.path.isfile(weights_path):
        if not train_if_missing:
            raise FileNotFoundError(f"no shapes classifier at {weights_path}; train it with {_train_command(weights_path)}")
        model = train_shapes_classifier(resolution, steps, seed)
        accuracy = heldout_accuracy(model, resolution, seed=seed)
        save_shapes_classifier(model, weights_path, resolution, steps=steps, seed=seed, accuracy=accuracy)
    model, metadata = load_shapes_classifier(weights_path)
    if metadata["resolution"] != resolution:
        raise ValueError(
            f"{weights_path} holds a classifier trained at {metadata['resolution']} px, not {resolution} px; "
            "use one file per resolution (e.g. shapes_classifier_<res>px.pt)."
        )
    return ShapesClassifierExtractor(model, resolution, file_digest(weights_path)).to(device)


def parse_caption(caption: str) -> dict[str, int]:
    """Class index per head of the single object of `a {color} {shape} at the {position}`.

    Multi-object captions are refused: the classifier sees one object per image, and on two-object
    images its answer matches the caption's first object only about half the time.
    """
    if " and " in caption:
        raise ValueError(
            f"caption {caption!r} names several objects; prompt fidelity is defined for single-object shapes "
            "data only (write_shapes(num_objects=1))."
        )
    (obj,) = parse_caption_objects(caption)
    return {head: HEADS[head].index(obj[head]) for head in HEADS}


def caption_match_rates(predictions: dict[str, torch.Tensor], captions: Sequence[str]) -> dict[str, float]:
    """Compare predicted class indices per head with the captions; keys are prefixed `prompt_fidelity_`."""
    targets = [parse_caption(caption) for caption in captions]
    if any(len(predictions[head]) != len(targets) for head in HEADS):
        raise ValueError(f"got {len(targets)} captions but predictions of lengths "
                         f"{ {head: len(values) for head, values in predictions.items()} }")
    matches = {head: torch.as_tensor(predictions[head]).cpu() == torch.tensor([t[head] for t in targets])
               for head in HEADS}
    matches["all"] = matches["color"] & matches["shape"] & matches["position"]
    return {f"prompt_fidelity_{head}": float(hits.double().mean()) for head, hits in matches.items()}


def _train_command(path: str) -> str:
    return f"`python -m ldm.metrics.shapes_classifier --out {path} --resolution 64 --steps {DEFAULT_STEPS} --seed 0`"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shapes classifier (shapes_cnn extractor) and cache it.")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train_shapes_classifier(args.resolution, args.steps, args.seed, args.batch_size)
    train_seconds = time.perf_counter() - start
    accuracy = heldout_accuracy(model, args.resolution, seed=args.seed)
    save_shapes_classifier(model, args.out, args.resolution, steps=args.steps, seed=args.seed,
                           batch_size=args.batch_size, accuracy=accuracy)
    print(json.dumps({"out": args.out, "train_seconds": round(train_seconds, 1),
                      "threads": torch.get_num_threads(), "heldout_accuracy": accuracy}, indent=1))


if __name__ == "__main__":
    main()
