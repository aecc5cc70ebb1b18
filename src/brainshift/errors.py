"""Error types. Every user-facing error is a :class:`BrainshiftError` (a ``ValueError``) whose message
says what was expected and what was found; the CLI prints it as one line and exits with code 2."""


class BrainshiftError(ValueError):
    """Bad input or an impossible request, with a message naming what was expected and what was found."""


class InputFileError(BrainshiftError):
    """A file is missing, unreadable or in an unsupported format."""


class GeometryError(BrainshiftError):
    """Shapes, grids or frames do not match (e.g. a field on another grid than the image)."""


class KeypointError(BrainshiftError):
    """Keypoints are unusable: too few, coplanar, duplicated, non-finite or outside the image."""


class SolverError(BrainshiftError):
    """A numerical solve did not converge or the model is under-constrained."""
