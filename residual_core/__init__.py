"""residual_core: the science of the ResiDual pipeline (no orchestration imports here)."""

__version__ = "0.1.0"
