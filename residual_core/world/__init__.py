"""A synthetic world for the embedded default: coloured digit glyphs on small canvases.

Pretrained CLIP weights and real datasets cannot be downloaded everywhere, and a random-weight
model has no zero-shot ability. The embedded default model (``residual-tiny``) is therefore
pretrained by :mod:`residual_core.world.pretraining` on image-caption pairs rendered here from
scikit-learn's bundled digits (1,797 8x8 glyphs, shipped with the package, no download).

Each sample is one glyph, upsampled with bicubic interpolation to 16 px (``small``) or 24 px
(``large``) and drawn in one corner of a 32x32 RGB canvas (``position``: ``top left`` ...), in one
of 6 ink colours on one of 3 backgrounds; the five attributes (:data:`CLASSNAMES`) are drawn
independently. Seeded jitter (0-2 px offset from the corner, ink and background colour noise,
stripe phase, pixel noise) makes every image distinct, and :func:`render` is a pure function of
its :class:`Sample`. Every ink is brighter than every background, so a digit is the same
bright pattern in every colour (with both contrast signs, a supervised classifier of the tiny
ViT reached 52% on digits; with this palette, 80% in the same 400 steps).

Glyph instances are split once per digit (:func:`glyph_split`): 60% for pretraining, the rest for
the downstream tasks, so no downstream image shows a glyph the model was pretrained on.

Captions (:func:`caption`) mention a random subset of the attributes, each with the probability
given by a :class:`CaptionMix` (digit 80%, colour and background 60%, position and size 5%).
Position and size are mentioned rarely (as CLIP's web captions rarely describe what EuroSAT or
MNIST ask), so their zero-shot accuracy is weak although the image tower encodes them; that is the
gap ResiDual closes.

Downstream tasks ``world/<attribute>`` (:data:`TASKS`) are registered with
:func:`residual_core.datasets.register_dataset` on import. All five label one shared pool of
4,200 images (train 2,400 / val 600 / test 1,200, :data:`SPLIT_SIZES`) by one attribute each, so
the other attributes vary independently, every task's labels are exactly balanced within each
split, and :func:`residual_core.world.evaluation.evaluate_world` extracts each split once for all five
tasks (the pipeline keeps one store per task, as for any dataset: a few seconds each). Sample ids
are positions in that pool.
"""
