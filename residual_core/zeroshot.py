"""Zero-shot text classifiers (METHOD §3): per class, embed every template, L2-normalise, average,
renormalise. Logits ``x @ W.T`` with unnormalised ``x`` give the same argmax as CLIP's
``scale · norm(x) · W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import ResidualError


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
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        chunks.append(model.encode_text(tokens).float())
    emb = torch.cat(chunks).reshape(len(classnames), len(templates), -1)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    weights = emb.mean(1)
    weights = weights / weights.norm(dim=-1, keepdim=True)
    return TextClassifier(list(classnames), list(templates), emb.cpu(), weights.cpu())


def accuracy(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Top-1 accuracy of ``[N, C]`` logits against ``[N]`` integer labels."""
    pred = np.asarray(torch.as_tensor(logits).argmax(-1))
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ResidualError(f"{pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred == labels).mean()) if labels.size else float("nan")
