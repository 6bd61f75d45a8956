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


def test_prototypes_are_the_class_means_in_both_normalisations():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    labels = np.repeat(np.arange(3), 50)
    x = centres[labels] + rng.normal(size=(150, 16))
    means = np.stack([x[labels == c].mean(0) for c in range(3)])
    w = prototype_classifier(x, labels, 3)  # the authors': plain means
    assert w.shape == (3, 16) and w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), means, rtol=1e-6, atol=1e-6)
    unit = prototype_classifier(x, labels, 3, normalize="l2")
    np.testing.assert_allclose(unit.numpy(), means / np.linalg.norm(means, axis=1, keepdims=True),
                               rtol=1e-6, atol=1e-6)
    assert accuracy(torch.as_tensor(x, dtype=torch.float32) @ unit.T, labels) > 0.9
    with pytest.raises(ResidualError, match="labels must lie"):
        prototype_classifier(x, labels + 1, 3)
    with pytest.raises(ResidualError, match="no training sample"):
        prototype_classifier(x[:100], labels[:100], 3)
    with pytest.raises(ResidualError, match="unknown prototype normalisation 'max'"):
        prototype_classifier(x, labels, 3, normalize="max")
