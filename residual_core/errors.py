"""Exceptions for user-facing errors.

Every error a user can cause (bad names, missing files, mismatched stores, wrong shapes) is raised
as a :class:`ResidualError` subclass with a message that says what was expected and how to fix it.
The CLI prints such errors as one line and exits with status 2; anything else is a bug.
"""


class ResidualError(Exception):
    """Base class of errors caused by input, configuration or data (not by a bug)."""


class UnknownModelError(ResidualError, KeyError):
    """A model name or pretrained tag that open_clip does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(ResidualError):
    """Pretrained weights that are neither cached nor downloadable."""


class UnsupportedModelError(ResidualError):
    """A model whose structure the decomposition cannot represent exactly."""


class DatasetNotFoundError(ResidualError):
    """A dataset that is not under the data root (or not registered)."""


class StoreError(ResidualError):
    """A feature/spectral store that is missing, incomplete, corrupt, foreign or mismatched."""


class ShapeError(ResidualError, ValueError):
    """An array or tensor whose shape or dtype does not fit what the call expects."""
