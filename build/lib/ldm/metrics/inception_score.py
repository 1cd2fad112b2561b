"""Inception score (Salimans et al. 2016) from classifier logits."""
from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over `splits` chunks of IS = exp(E_x KL(p(y|x) ‖ p(y))).

    Salimans et al. 2016, sec. 4: p(y|x) = softmax(logits), p(y) the mean of p(y|x) over the chunk.
    Matches the original TF code and torch-fidelity (`isc_splits`, `shuffle=False`): consecutive
    chunks [i·N/splits, (i+1)·N/splits), float64, log-probabilities from log_softmax, population std.
    With Inception-v3 logits this is the standard IS; with another classifier's logits it is that
    classifier's score and must be reported as such.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()
    if logits.ndim != 2 or splits < 1 or len(logits) < splits:
        raise ValueError(
            f"inception_score needs (N, num_classes) logits with N >= splits >= 1, got shape "
            f"{tuple(logits.shape)} and splits={splits}; pass more samples or fewer splits."
        )
    log_probs = logits.log_softmax(dim=1)
    num_samples = len(logits)
    scores = []
    for split in range(splits):
        chunk = log_probs[split * num_samples // splits : (split + 1) * num_samples // splits]
        probs = chunk.exp()
        log_marginal = probs.mean(dim=0).log()
        # 0·log 0 = 0: classes with underflowed probability would otherwise give 0·inf = NaN.
        kl_terms = torch.where(probs > 0, probs * (chunk - log_marginal), torch.zeros_like(probs))
        kl_per_sample = kl_terms.sum(dim=1)
        scores.append(kl_per_sample.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))
