"""Zero-shot text classifiers and class prototypes."""

import numpy as np
import pytest
import torch

from residual_core.errors import ResidualError
from residual_core.identity import EMBEDDED_MODEL
from residual_core.method.models import load_model
from residual_core.method.zeroshot import accuracy, prototype_classifier, text_classifier


def test_text_classifier_averages_normalised_templates():
    loaded = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    clf = text_classifier(loaded.model, loaded.tokenizer, ["cat", "dog"], ["a {}.", "my {}!"])
    with torch.inference_mode():
        e = loaded.model.encode_text(loaded.tokenizer(["a cat.", "my cat!"])).float()
    e = e / e.norm(dim=-1, keepdim=True)
    ref = e.mean(0) / e.mean(0).norm()
    assert torch.allclose(clf.weights[0], ref, atol=1e-6)
    assert clf.template_embeddings.shape == (2, 2, 64)
    with pytest.raises(ResidualError, match="must contain"):
        text_classifier(loaded.model, loaded.tokenizer, ["cat"], ["no slot"])


def test_prototypes_classify_separated_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 50)
    x = centres[labels] + rng.normal(size=(150, 16))
    w = prototype_classifier(x, labels, 3)
    assert w.shape == (3, 16)
    assert torch.allclose(w.norm(dim=-1), torch.ones(3))
    expected = centres / np.linalg.norm(centres, axis=1, keepdims=True)
    assert np.abs(w.numpy() - expected).max() < 0.05
    assert accuracy(torch.as_tensor(x, dtype=torch.float32) @ w.T, labels) > 0.9
    with pytest.raises(ResidualError, match="labels must lie"):
        prototype_classifier(x, labels + 1, 3)
    with pytest.raises(ResidualError, match="no training sample"):
        prototype_classifier(x[:100], labels[:100], 3)
