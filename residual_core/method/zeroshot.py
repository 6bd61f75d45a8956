"""Zero-shot text classifiers (METHOD §3): per class, embed every template, L2-normalise, average,
renormalise. Logits ``x @ W.T`` with unnormalised ``x`` give the same argmax as CLIP's
``scale · norm(x) · W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from residual_core.errors import ResidualError


@dataclass
class TextClassifier:
    """Per-template and averaged class embeddings.

    ``template_embeddings [C, T, E]`` (each L2-normalised), ``weights [C, E]`` (the averaged,
    renormalised class vectors, the classifier).
    """

    classnames: list[str]
    templates: list[str]
    template_embeddings: torch.Tensor
    weights: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, E] -> [N, C]`` scores ``features @ weights.T``."""
        return features.float() @ self.weights.to(features.device).T


@torch.inference_mode()
def text_classifier(
    model: torch.nn.Module,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> TextClassifier:
    """Build the zero-shot classifier of ``classnames`` from prompt ``templates`` (``{}`` = name)."""
    if not classnames or not templates:
        raise ResidualError("a text classifier needs at least one class name and one template")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ResidualError(f"templates must contain '{{}}' for the class name: {bad[:3]}")
    if not hasattr(model, "encode_text"):
        raise ResidualError("this model has no text tower; use class prototypes instead")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = encode_texts(model, tokenizer, prompts, batch_size)
    emb = emb.reshape(len(classnames), len(templates), -1)
    weights = emb.mean(1)
    weights = weights / weights.norm(dim=-1, keepdim=True)
    return TextClassifier(list(classnames), list(templates), emb.cpu(), weights.cpu())


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str],
                 batch_size: int = 256) -> torch.Tensor:
    """``[len(texts), E]`` float32 unit-norm text embeddings (on the CPU) by the model's text
    tower, in batches of ``batch_size``."""
    if not hasattr(model, "encode_text"):
        raise ResidualError("this model has no text tower")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(model.encode_text(tokens).float())
    emb = torch.cat(chunks)
    return (emb / emb.norm(dim=-1, keepdim=True)).cpu()


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy of ``[N, C]`` logits against ``[N]`` integer labels."""
    pred = np.asarray(torch.as_tensor(logits).argmax(-1))
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ResidualError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred == labels).mean()) if labels.size else float("nan")


CLASSIFIERS = ("text", "centroid")
"""Which frozen classifier a task uses: ``text`` (the zero-shot text classifier of the feature
store) or ``centroid`` (class prototypes of the train split's encodings, the authors'
``CentroidClassifier`` for towers without text)."""

CENTROID_NORMS = ("none", "l2")
"""How class prototypes are normalised: ``none`` (the authors': the raw per-class means, logits
``x @ C.T`` on unnormalised ``x``) or ``l2`` (each prototype L2-normalised, like the text
classifier's class vectors, so that no class wins by the norm of its mean)."""


def prototype_classifier(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                         n_classes: int, normalize: str = "none") -> torch.Tensor:
    """Class prototypes for towers without text (METHOD §4): ``[C, E]`` per-class mean of the
    ``[N, E]`` train encodings (float64 sums), used like a text classifier (``x @ W.T``).

    ``normalize``: ``none`` (the authors' ``build_vision_prototypical_classifier``: plain means)
    or ``l2`` (unit-norm prototypes; see :data:`CENTROID_NORMS`).

    Raises :class:`ResidualError` for labels outside ``[0, n_classes)``, a class with no sample
    or an unknown ``normalize``.
    """
    sums, counts = class_sums(features, labels, n_classes)
    return prototypes(sums, counts, normalize)


def class_sums(features: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
               n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class float64 sums ``[C, E]`` and counts ``[C]`` of ``[N, E]`` features (add the
    results of several batches to stream a split)."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ResidualError(f"need features [N, E] and labels [N], got {tuple(x.shape)} and "
                            f"{tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= n_classes):
        raise ResidualError(f"labels must lie in [0, {n_classes}), got {y.min()}..{y.max()}")
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    return sums, torch.bincount(y, minlength=n_classes)


def prototypes(sums: torch.Tensor, counts: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """``[C, E]`` float32 prototypes from :func:`class_sums`' sums and counts."""
    if normalize not in CENTROID_NORMS:
        raise ResidualError(f"unknown prototype normalisation {normalize!r}; use one of "
                            f"{', '.join(CENTROID_NORMS)}")
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ResidualError(f"classes {missing} have no training sample: no prototype")
    protos = sums / counts[:, None]
    if normalize == "l2":
        protos = protos / protos.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return protos.float()
