"""The science, on tensors and arrays: models and their residual units (:mod:`.models`,
:mod:`.units`), the exact decomposition (:mod:`.decompose`), zero-shot classifiers
(:mod:`.zeroshot`), out-of-core PCA and intrinsic dimension (:mod:`.spectral`), the ResiDual map
and baselines (:mod:`.adapters`), minibatches of cached features (:mod:`.batches`), training
(:mod:`.training`) and the head-selection experiment (:mod:`.head_selection`)."""
