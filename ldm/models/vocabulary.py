"""A from-scratch text encoder's vocabulary built from its training captions (`TextTransformer(vocabulary=...)`).

The CLIP BPE tokenizer has 49,408 tokens; a data set such as `shapes` uses about 20 of them. A token embedding
over the full vocabulary then carries 49,408 x width parameters of which all but those rows never receive a
gradient, yet every one of them goes through AdamW, the EMA and every checkpoint. The data vocabulary keeps the
tokenizer (any text still tokenizes) and gives the embedding one row per token id the captions use, plus row 0,
the out-of-vocabulary (OOV) token. For the used rows training is unchanged: an embedding row's gradient and
Adam's per-element update depend on that row only.

Unknown tokens (a prompt with a word the captions never had) are MAPPED to the OOV row, counted
(`DataVocabulary.num_unknown`) and warned about, naming them: the model has never seen them, so it can only treat
them as "some word". The ids are a plain list in the conditioner's config, hence in every checkpoint's
hyperparameters; nothing else is stored (the lookup table is rebuilt from them).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import open_clip
import torch
from torch import nn

OOV_ROW = 0
MAX_NAMED_UNKNOWN = 8  # unknown tokens named per warning


def caption_token_ids(tokenize: Callable[[list[str]], torch.Tensor], captions: Iterable[str],
                      always: Sequence[int] = (), chunk: int = 1024) -> list[int]:
    """The sorted token ids of `captions` (tokenized in chunks), with the `always` ids (start / end of text,
    padding: the empty prompt of classifier-free guidance needs them even if no caption is empty)."""
    ids: set[int] = set(int(i) for i in always)
    batch: list[str] = []
    for caption in captions:
        batch.append(caption)
        if len(batch) == chunk:
            ids.update(tokenize(batch).unique().tolist())
            batch = []
    if batch:
        ids.update(tokenize(batch).unique().tolist())
    return sorted(ids)


class DataVocabulary(nn.Module):
    """Token ids of the full tokenizer -> rows of a small table: row 0 is OOV, row i + 1 is `ids[i]`."""

    def __init__(self, ids: Sequence[int] | str, full_size: int) -> None:
        super().__init__()
        if isinstance(ids, str):
            raise ValueError(
                f"model.conditioner.vocabulary={ids!r}: `data` is filled in by train.py from the training captions "
                "(ldm/training/text_vocabulary.py) before the model is built. Outside train.py pass the list of "
                "token ids (a checkpoint's hyperparameters hold it), or vocabulary=null for the full tokenizer.")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < full_size]
        if bad or len(set(ids)) != len(ids) or not ids:
            raise ValueError(f"vocabulary: {len(ids)} token ids, need distinct ids in [0, {full_size}); "
                             f"got {'out-of-range ' + str(bad[:5]) if bad else 'duplicates or none'}.")
        self.ids = ids
        lookup = torch.full((full_size,), OOV_ROW, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(1, len(ids) + 1)
        self.register_buffer("lookup", lookup, persistent=False)  # rebuilt from `ids`: not in the state dict
        self._known = lookup != OOV_ROW  # host copy: unknown tokens are found before the ids leave the host
        self.num_unknown = 0  # unknown token occurrences seen by `check` (this process)

    @property
    def num_embeddings(self) -> int:
        return len(self.ids) + 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lookup[tokens]

    def check(self, tokens: torch.Tensor, decode: Callable[[list[int]], str]) -> None:
        """Count and warn about the tokens (host tensor) that map to OOV."""
        unknown = tokens[~self._known[tokens.cpu()]]
        if unknown.numel() == 0:
            return
        self.num_unknown += unknown.numel()
        names = [decode([int(i)]).strip() for i in unknown.unique()[:MAX_NAMED_UNKNOWN].tolist()]
        warnings.warn(
            f"{unknown.numel()} token(s) are not in the text encoder's vocabulary (built from the training "
            f"captions) and are read as the out-of-vocabulary token: {names}. The model never saw them; rephrase "
            "with words of the training captions.", UserWarning, stacklevel=3)


def vocabulary_of_captions(tokenizer_name: str, captions: Iterable[str]) -> list[int]:
    """The data vocabulary (sorted token ids) of `captions` under the open_clip tokenizer `tokenizer_name`."""
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    always = (0, tokenizer.sot_token_id, tokenizer.eot_token_id)  # 0 pads open_clip's rows
    return caption_token_ids(tokenizer, captions, always=always)
