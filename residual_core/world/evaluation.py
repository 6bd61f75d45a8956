"""Measuring what the embedded model learned on the world's downstream tasks
(:func:`evaluate_world`): per-task zero-shot accuracy, per-head zero-shot accuracy (each head's
contribution ``y_u`` scored alone by the text classifier), a linear probe on the final image
embeddings, and each head's ``K_90``; and :func:`attribute_separation`, how much of the
spread of a unit's data along given directions each attribute's labels account for (the ground
truth a text explanation of a head is checked against).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.decompose import decompose, readout_maps
from residual_core.method.explain import class_separation
from residual_core.method.models import LoadedModel, load_model
from residual_core.method.zeroshot import TextClassifier, accuracy, text_classifier
from residual_core.world import rendering
from residual_core.world.pretraining import _threads

# -------------------------------------------------------------------------------- measurement


@torch.no_grad()  # not inference_mode: callers may train on these features (e.g. ResiDual's λ)
def extract_world(loaded: LoadedModel, split: str, batch_size: int = 400) -> torch.Tensor:
    """Per-unit contributions of one split of the downstream pool: ``[N, U, E]`` float32.

    Shared by all tasks (they label the same images); ``.sum(1)`` is ``encode_image``.
    """
    samples, _ = rendering.downstream_samples(split)
    visual = loaded.model.visual
    maps = readout_maps(loaded.model)
    chunks = []
    for start in range(0, len(samples), batch_size):
        part = samples.take(np.arange(start, min(start + batch_size, len(samples))))
        x = rendering.to_model_input(rendering.render_batch(part), visual.image_mean, visual.image_std)
        chunks.append(decompose(loaded.model, x.to(loaded.device), maps).contributions.cpu())
    return torch.cat(chunks)


@dataclass
class WorldReport:
    """What the model learned about the world (accuracies in [0, 1]).

    Attributes:
        zero_shot: task -> zero-shot accuracy of the full image embedding (``split``).
        head_zero_shot: task -> ``[L, H]`` accuracy of each head's ``y_u`` alone (``split``).
        probe: task -> accuracy on ``split`` of a logistic regression trained on the train
            split's final embeddings (empty when not computed).
        k90: ``[L, H]`` components for 90% explained variance of each head's ``y_u`` on the
            train split (the same images for every task), or None when not computed.
        chance: task -> ``1 / num_classes``.
        split: the evaluated split.
    """

    zero_shot: dict[str, float]
    head_zero_shot: dict[str, np.ndarray]
    probe: dict[str, float]
    k90: np.ndarray | None
    chance: dict[str, float]
    split: str

    def top_head(self, task: str) -> str:
        """Name ``L{l}H{h}`` of the head with the best zero-shot accuracy on ``task``."""
        layer, head = np.unravel_index(np.argmax(self.head_zero_shot[task]),
                                       self.head_zero_shot[task].shape)
        return f"L{layer}H{head}"

    def format(self) -> str:
        """A plain-text table, one row per task."""
        lines = [f"{'task':<18} {'chance':>6} {'zero-shot':>9} {'probe':>6}  top heads "
                 f"(zero-shot acc, {self.split})"]
        for task, acc in self.zero_shot.items():
            per_head = self.head_zero_shot[task]
            order = np.argsort(per_head, axis=None)[::-1][:3]
            tops = ", ".join(f"L{i // per_head.shape[1]}H{i % per_head.shape[1]} "
                             f"{per_head.flat[i]:.2f}" for i in order)
            probe = f"{self.probe[task]:.3f}" if task in self.probe else "-"
            lines.append(f"{task:<18} {self.chance[task]:>6.2f} {acc:>9.3f} {probe:>6}  {tops}")
        if self.k90 is not None:
            lines.append("K_90 per head (rows = layers): " + "; ".join(
                " ".join(str(int(k)) for k in row) for row in self.k90))
        return "\n".join(lines)


def _classifiers(loaded: LoadedModel, tasks: Sequence[str]) -> dict[str, TextClassifier]:
    from residual_core.datasets import dataset_info

    out = {}
    for task in tasks:
        info = dataset_info(task)
        out[task] = text_classifier(loaded.model, loaded.tokenizer, info.classnames, info.templates)
    return out


def _probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(test_x, test_y))


def head_k90(contributions: torch.Tensor, n_layers: int, n_heads: int) -> np.ndarray:
    """``[L, H]`` K_90 of each head, from ``[N, U, E]`` contributions in canonical unit order."""
    from residual_core.method.spectral import unit_stats  # imports dask: only needed here

    heads = contributions[:, 1 + n_layers:].double().numpy()  # [N, L·H, E]
    k90 = [unit_stats(np.linalg.eigvalsh(np.cov(heads[:, u].T))[::-1])["k90"]
           for u in range(heads.shape[1])]
    return np.asarray(k90).reshape(n_layers, n_heads)


def evaluate_world(
    model: LoadedModel | str | Path,
    *,
    tasks: Sequence[str] = rendering.TASKS,
    split: str = "test",
    train_split: bool = True,
    num_threads: int | None = 1,
) -> WorldReport:
    """Measure a ``residual-tiny`` model (loaded, or a checkpoint path) on the world tasks.

    Features of ``split`` are extracted once for all tasks (they share the images). With
    ``train_split``, the train split is extracted too, for the linear probe (standardised 64-d
    embeddings, sklearn ``LogisticRegression``) and ``K_90``; without, those stay empty.
    ``num_threads`` as in :func:`pretrain_embedded`.
    """
    with _threads(num_threads):
        loaded = model if isinstance(model, LoadedModel) else load_model(
            EMBEDDED_MODEL, model, device="cpu")
        maps = readout_maps(loaded.model)
        n_layers, n_heads = maps.n_layers, maps.n_heads
        y_eval = extract_world(loaded, split)
        y_train = None
        if train_split:
            y_train = y_eval if split == "train" else extract_world(loaded, "train")
        classifiers = _classifiers(loaded, tasks)
    eval_samples, _ = rendering.downstream_samples(split)
    train_samples, _ = rendering.downstream_samples("train")
    k90 = head_k90(y_train, n_layers, n_heads) if y_train is not None else None
    report = WorldReport({}, {}, {}, k90, {}, split)
    for task, clf in classifiers.items():
        attribute = rendering.task_attribute(task)
        labels = eval_samples.labels(attribute)
        report.chance[task] = 1.0 / len(clf.classnames)
        report.zero_shot[task] = accuracy(clf.logits(y_eval.sum(1)), labels)
        per_head = (y_eval[:, 1 + n_layers:] @ clf.weights.T).argmax(-1).numpy()  # [N, L·H]
        report.head_zero_shot[task] = (per_head == labels[:, None]).mean(0).reshape(
            n_layers, n_heads)
        if y_train is not None:
            report.probe[task] = _probe_accuracy(
                y_train.sum(1).numpy(), train_samples.labels(attribute),
                y_eval.sum(1).numpy(), labels)
    return report


def attribute_separation(contributions: np.ndarray, directions: np.ndarray,
                         samples: rendering.WorldSamples) -> dict[str, np.ndarray]:
    """For each attribute, the share of the variance of ``contributions`` ``[N, E]`` along each
    unit direction in ``directions`` ``[k, E]`` that its class means account for (the
    between-class share eta^2 in ``[0, 1]``, one value per direction, by
    :func:`~residual_core.method.explain.class_separation`): a direction that an attribute
    separates well scores near 1 for it. ``samples`` label the ``N`` rows (in order).
    """
    return {a: class_separation(contributions, directions,
                                samples.digit if a == "digit" else samples.labels(a))
            for a in rendering.ATTRIBUTES}
