"""Conditioners: turn a batch entry (captions, class labels, nothing) into the UNet's keyword arguments.

Interface (docs/architecture.md, "Conditioners"): `batch_key`, `output_dim`, and
`forward(inputs, drop_mask=None) -> dict`, where rows with `drop_mask` true get the *null condition*
(the empty prompt, the null class). The same null condition serves classifier-free-guidance dropout
in training and the unconditional branch in sampling (Ho & Salimans 2022), so the two always agree.
`inputs` is a list (of prompts or labels) or a LongTensor (token ids or labels) for every conditioner.
"""
from __future__ import annotations

import os
from typing import Sequence

import huggingface_hub
import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from torch import nn

from ldm.models.vocabulary import DataVocabulary
from ldm.utils.downloads import download_blocker
from ldm.utils.files import load_checkpoint

Inputs = Sequence[str] | Sequence[int] | torch.Tensor | None


def drop_mask(
    batch_size: int,
    p_uncond: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rows whose condition is replaced by the null condition, each independently with probability
    `p_uncond` (classifier-free guidance training, Ho & Salimans 2022, Alg. 1)."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be a probability in [0, 1], got {p_uncond} (the paper uses 0.1-0.2).")
    return torch.rand(batch_size, generator=generator, device=device) < p_uncond


class _TokenConditioner(nn.Module):
    """Shared text plumbing: tokenise on the host, ship ids once, swap dropped rows to the empty prompt.

    `padding_mask=True` also returns `context_mask` (B, L), true up to and including each prompt's
    end-of-text token, which the UNet's cross-attention uses as a key-padding mask: the padding states
    (which a bidirectional encoder fills with the prompt's content) are then never attended to. Off by
    default: Stable Diffusion 1.x / 2.x attend to all 77 states. `pad_token_id` replaces the tokenizer's
    padding after end-of-text (open_clip pads with 0; SD 1.x was trained on CLIP's end-of-text 49407)."""

    batch_key = "caption"

    def __init__(self, tokenizer_name: str, padding_mask: bool = False, pad_token_id: int | None = None) -> None:
        super().__init__()
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        self.context_length: int = self.tokenizer.context_length
        self.eot_token_id: int = self.tokenizer.eot_token_id
        self.padding_mask = padding_mask
        self.pad_token_id = pad_token_id
        # the empty prompt's ids, kept on the module's device: dropping a row costs no host transfer
        self.register_buffer("null_tokens", self._padded(self.tokenizer([""])), persistent=False)

    def forward(self, inputs: Inputs, drop_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tokens = self.tokenize(inputs)
        if drop_mask is not None:
            tokens = torch.where(drop_mask.to(tokens.device)[:, None], self.null_tokens, tokens)
        out = {"context": self.encode_tokens(tokens)}
        if self.padding_mask:
            out["context_mask"] = self.token_mask(tokens)
        return out

    def token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: positions up to and including the first end-of-text token (all of a row without one)."""
        is_eot = tokens == self.eot_token_id
        last = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.shape[1] - 1)
        return torch.arange(tokens.shape[1], device=tokens.device)[None, :] <= last[:, None]

    def _padded(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pad_token_id is None:
            return tokens
        return torch.where(self.token_mask(tokens), tokens, torch.full_like(tokens, self.pad_token_id))

    def tokenize(self, inputs: Inputs) -> torch.Tensor:
        """(B, context_length) token ids on the module's device from prompts or ready-made ids."""
        device = self.null_tokens.device
        if isinstance(inputs, torch.Tensor):
            if inputs.dtype != torch.long or inputs.ndim != 2 or inputs.shape[1] != self.context_length:
                raise ValueError(
                    f"{type(self).__name__} takes prompts (list[str]) or token ids (LongTensor of shape "
                    f"(B, {self.context_length})); got a {inputs.dtype} tensor of shape {tuple(inputs.shape)}."
                )
            return self._padded(inputs.to(device, non_blocking=True))
        if inputs is None or isinstance(inputs, str) or not all(isinstance(text, str) for text in inputs):
            raise TypeError(
                f"{type(self).__name__} takes a list of prompts, one string per sample; got {inputs!r:.80}. "
                "A text model needs the batch's 'caption' entry (an empty string for no caption)."
            )
        tokens = self._padded(self.tokenizer(list(inputs)))
        self.check_tokens(tokens)
        if device.type == "cuda":
            tokens = tokens.pin_memory()  # pinned: the copy below runs asynchronously
        return tokens.to(device, non_blocking=True)

    def truncation(self, prompt: str) -> str | None:
        """What of `prompt` the model sees when the tokenizer cuts it to the context (None: it fits)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # a tokenizer without a plain encode (HF): a full row is taken as cut
            tokens = self.tokenizer([prompt])[0]
            return f"(cut to {self.context_length} tokens)" if bool(tokens[-1] != 0) else None
        ids = encode(prompt)
        if len(ids) + 2 <= self.context_length:  # + start and end tokens
            return None
        return self.tokenizer.decode(ids[: self.context_length - 2]).strip()

    def check_tokens(self, tokens: torch.Tensor) -> None:
        """Host-side look at freshly tokenized prompts (a data vocabulary flags its unknown tokens)."""

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TextTransformer(_TokenConditioner):
    """Transformer text encoder trained jointly with the UNet from scratch, as the LDM paper's
    text-to-image model (Sec. 4.3.1): token + learned positional embeddings, pre-LN bidirectional
    transformer layers, final LayerNorm; every token state is a cross-attention key (Eq. 3).

    torch's `nn.TransformerEncoderLayer` (fused fast path in inference) measured as fast as an
    SDPA-block implementation on CPU (fwd+bwd and inference within 3 %), so it is used here.

    `vocabulary`: the token ids of the training captions (train.py fills `data` in): the embedding then has a
    row per used token plus an out-of-vocabulary row (ldm/models/vocabulary.py); None: all of the tokenizer's."""

    def __init__(
        self,
        width: int = 1280,
        layers: int = 32,
        heads: int = 8,
        context_length: int = 77,
        tokenizer: str = "ViT-L-14",
        dropout: float = 0.0,
        padding_mask: bool = False,
        vocabulary: Sequence[int] | str | None = None,
    ) -> None:
        super().__init__(tokenizer, padding_mask)
        if width % heads != 0:
            raise ValueError(f"TextTransformer width={width} must be divisible by heads={heads}.")
        if context_length != self.context_length:
            raise ValueError(
                f"context_length={context_length}, but the '{tokenizer}' tokenizer makes {self.context_length} "
                f"tokens per prompt; pass context_length={self.context_length}."
            )
        self.output_dim = width
        self.vocabulary = None if vocabulary is None else DataVocabulary(vocabulary, self.tokenizer.vocab_size)
        self.token_embedding = nn.Embedding(self.tokenizer.vocab_size, width)  # the full table first: see below
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.vocabulary is not None:
            # Keep the used rows of the full table just drawn: the random stream, and with it every weight of this
            # model and of the nets built after it, is then the full vocabulary's, so the data vocabulary changes
            # only what a step costs. (A table drawn at the small size gave every later net other initial weights:
            # measured on the quickstart, seed 0, that run never learned the position words, while the same seed
            # with the full vocabulary did.) The OOV row starts at the table's mean: "some word".
            full = self.token_embedding.weight.data
            rows = torch.cat([full.mean(0, keepdim=True), full[torch.tensor(self.vocabulary.ids)]])
            self.token_embedding = nn.Embedding.from_pretrained(rows, freeze=False)

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if self.vocabulary is not None:
            self.vocabulary.check(tokens, self.tokenizer.decode)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens if self.vocabulary is None else self.vocabulary(tokens)
        x = self.token_embedding(rows) + self.positional_embedding
        return self.ln_final(self.transformer(x))


class FrozenOpenCLIP(_TokenConditioner):
    """A frozen OpenCLIP text tower; token states of the penultimate block (after `ln_final`), as
    Stable Diffusion 2.x, or of the last block. Only the text tower is kept: under `self.model` the
    state-dict keys are SD 2.x's `cond_stage_model.model.*` (a prefix rename away)."""

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        layer: str = "penultimate",
        checkpoint_path: str | None = None,
        width: int | None = None,
        padding_mask: bool = False,
        pad_token_id: int | None = None,
    ) -> None:
        """`pretrained`: an open_clip tag or a local file; `checkpoint_path` (a local `.pt`/`.bin`/
        `.safetensors` state dict) wins over it; neither gives random weights (tests).
        `width`, when given, is checked against the tower (the UNet's context_dim is set from it)."""
        if layer not in ("penultimate", "last"):
            raise ValueError(f"FrozenOpenCLIP layer must be 'penultimate' or 'last', got {layer!r}.")
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"Unknown open_clip architecture {arch!r}; open_clip.list_models() lists the known ones.")
        weights_file = _resolve_weights(arch, pretrained, checkpoint_path)  # before building: fail fast
        super().__init__(arch, padding_mask, pad_token_id)
        self.layer = layer
        self.model = _build_text_only(arch, config, pretrained)
        if weights_file is not None:
            _load_text_weights(self.model, weights_file)
        self.output_dim = self.tower.ln_final.normalized_shape[0]
        if width is not None and width != self.output_dim:
            raise ValueError(
                f"conditioner width={width}, but the {arch} text tower's width is {self.output_dim}: set "
                f"model.conditioner.width={self.output_dim} (the UNet's context_dim follows it)."
            )
        self.requires_grad_(False)
        self.train(False)

    @property
    def tower(self) -> nn.Module:
        """The module holding the text transformer (the CLIP itself, or `.text` of a CustomTextCLIP)."""
        return getattr(self.model, "text", self.model)

    def train(self, mode: bool = True) -> "FrozenOpenCLIP":
        return super().train(False)  # frozen: stays in inference mode whatever the owner does

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        blocks = tower.transformer.resblocks
        x = tower.token_embedding(tokens) + tower.positional_embedding
        for block in blocks[: len(blocks) - 1] if self.layer == "penultimate" else blocks:
            x = block(x, attn_mask=tower.attn_mask)
        return tower.ln_final(x)


class ClassEmbedder(nn.Module):
    """Learned class embedding; index `num_classes` is a learned null class (the unconditional input
    of classifier-free guidance)."""

    batch_key = "class_label"

    def __init__(self, num_classes: int, embed_dim: int = 512) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClassEmbedder needs num_classes >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.output_dim = embed_dim
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    def forward(self, inputs: Inputs, drop_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        labels = self._as_labels(inputs)
        valid = (labels >= 0) & (labels < self.num_classes)
        null = torch.full_like(labels, self.num_classes)
        if drop_mask is not None:
            drop_mask = drop_mask.to(labels.device)
            valid, labels = valid | drop_mask, torch.where(drop_mask, null, labels)
        if not bool(valid.all()):  # one host sync: a wrong label would silently index the null class
            raise ValueError(
                f"Class labels must be in [0, {self.num_classes}); got {labels[~valid].unique().tolist()}. "
                "-1 means the shard has no .cls files: a class-conditional model needs shards with "
                "{key}.cls, or use the 'text' or 'none' conditioner for this data."
            )
        return {"y": self.embedding(labels)}

    def _as_labels(self, inputs: Inputs) -> torch.Tensor:
        device = self.embedding.weight.device
        if isinstance(inputs, torch.Tensor):
            if inputs.dtype not in (torch.int64, torch.int32) or inputs.ndim != 1:
                raise ValueError(
                    f"ClassEmbedder takes integer labels of shape (B,); got {inputs.dtype} {tuple(inputs.shape)}."
                )
            return inputs.to(device, torch.long, non_blocking=True)
        try:
            return torch.tensor([int(label) for label in inputs], dtype=torch.long).to(device, non_blocking=True)
        except (TypeError, ValueError):
            raise TypeError(f"ClassEmbedder takes class indices (ints or digit strings); got {inputs!r:.80}.") from None


class NullConditioner(nn.Module):
    """Unconditional model: reads nothing, passes nothing to the UNet."""

    batch_key = None
    output_dim = 0

    def forward(self, inputs: Inputs = None, drop_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {}


class MissingConditioner(nn.Module):
    """Stands in for a text encoder the checkpoint did not provide, so the UNet and the
    autoencoder are usable; calling it says which encoder to supply (as `model.conditioner`)."""

    batch_key = "caption"

    def __init__(self, output_dim: int, needed: str) -> None:
        super().__init__()
        self.output_dim = output_dim
        self.needed = needed

    def forward(self, inputs: Inputs = None, drop_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise RuntimeError(
            f"This model has no text encoder (its checkpoint did not contain one we can load). Set "
            f"model.conditioner to {self.needed}, producing (B, L, {self.output_dim}) contexts, or call "
            "model.unet(x, t, context=...) with your own contexts."
        )


# ---------------------------------------------------------------- OpenCLIP weights
_TINY_VISION = {"image_size": 16, "patch_size": 16, "width": 8, "layers": 1, "head_width": 8}


def _build_text_only(arch: str, config: dict, pretrained: str | None) -> nn.Module:
    """The CLIP model with a placeholder vision tower, deleted afterwards: the real one (632 M
    parameters for ViT-H) is never built."""
    if "hf_model_name" in config["text_cfg"] or "multimodal_cfg" in config:
        raise ValueError(f"FrozenOpenCLIP supports open_clip's own text transformers; {arch} uses another text model.")
    config = {**config, "vision_cfg": _TINY_VISION}
    tag = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    if tag.get("quick_gelu"):
        config["quick_gelu"] = True  # the tag was trained with QuickGELU: match it
    model_class = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
    model = model_class(**config)
    del model.visual
    if getattr(getattr(model, "text", model), "cls_emb", None) is not None:
        raise ValueError(f"FrozenOpenCLIP: {arch}'s text tower uses a CLS token, which is not supported.")
    return model


def _load_text_weights(model: nn.Module, path: str) -> None:
    state = load_checkpoint(path)
    state = state.get("state_dict", state.get("model", state))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    if isinstance(model, open_clip.CustomTextCLIP):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this open_clip text tower: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Check that `arch` is the architecture the file was trained with."
        )


def _resolve_weights(arch: str, pretrained: str | None, checkpoint_path: str | None) -> str | None:
    """A local weights file, found without touching the network when it is cached. Offline (or with
    the hub unreachable) a missing file fails here at once, instead of after open_clip's ~45 s of
    download retries, naming the file to fetch and the option to pass."""
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"FrozenOpenCLIP checkpoint_path={checkpoint_path!r} does not exist.")
        return checkpoint_path
    if pretrained is None:
        return None
    tag = open_clip.get_pretrained_cfg(arch, pretrained)
    if not tag:
        if os.path.isfile(pretrained):
            return pretrained
        raise ValueError(
            f"pretrained={pretrained!r} is neither a file nor a known tag for {arch} "
            f"(known: {open_clip.list_pretrained_tags_by_model(arch)})."
        )
    source, names = _download_source(tag)
    cached = _find_cached(tag, names)
    if cached is not None:
        return cached
    blocker = download_blocker(source)
    if blocker is not None:
        raise FileNotFoundError(
            f"FrozenOpenCLIP: weights {arch}/{pretrained} are not cached and cannot be downloaded "
            f"({blocker}). On a machine with internet, "
            f"download {' or '.join(names)} from {source}, copy it here and pass "
            f"conditioner.checkpoint_path=/path/to/{names[0]} (model.conditioner.checkpoint_path=... in train.py)."
        )
    return open_clip.download_pretrained(tag)


def _download_source(tag: dict) -> tuple[str, list[str]]:
    """Where a tag's weights come from and the file names it may have there (safetensors first)."""
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else os.path.splitext(filename)[0] + ".safetensors"
        return f"{huggingface_hub.constants.ENDPOINT}/{repo}", [safe, filename]
    return tag["url"], [os.path.basename(tag["url"])]


def _find_cached(tag: dict, names: list[str]) -> str | None:
    """The file from the Hugging Face cache, or open_clip's URL cache, with no network access."""
    if tag.get("hf_hub"):
        repo = os.path.dirname(tag["hf_hub"])
        found = (huggingface_hub.try_to_load_from_cache(repo, name) for name in names)
        return next((path for path in found if isinstance(path, str)), None)
    path = os.path.join(os.path.expanduser("~/.cache/clip"), names[0])
    return path if os.path.isfile(path) else None
