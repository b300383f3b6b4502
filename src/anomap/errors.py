"""The project's exception types. The CLI prints their message as one line and exits non-zero."""


class AnomapError(Exception):
    """Base class of every error anomap raises on purpose."""


class DataError(AnomapError):
    """An image, mask or folder cannot be used (missing, unreadable, mismatched)."""


class BackboneError(AnomapError):
    """A feature extractor cannot be built (unknown name, missing or incompatible weights)."""


class ModelFileError(AnomapError):
    """A model file is missing, damaged, foreign or of an unsupported format version."""


class ScoreError(AnomapError):
    """Scores or maps are not finite, or metric inputs are inconsistent."""


class ParamError(AnomapError):
    """A parameter has the wrong type or lies outside its allowed values."""


class ExportError(AnomapError):
    """A model cannot be exported as a graph, or an exported file cannot be used."""
