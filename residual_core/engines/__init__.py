"""What each stage computes (:mod:`residual_core.stages` declares the stages and imports these
only when a stage runs): :mod:`.extract` (feature stores), :mod:`.spectral` (spectral stores and
tables, basis similarity), :mod:`.align` (fits, evaluations, head selection). The world's
pretraining is :mod:`residual_core.world.pretraining`."""
