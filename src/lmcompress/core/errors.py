"""Errors a user can act on. The CLI prints their message on one line (a traceback only with --debug)."""


class LmcompressError(Exception):
    """Base class: the message alone must tell the user what is wrong and what to do."""


class RecipeError(LmcompressError):
    """A recipe file or override has a bad field."""


class UnsupportedArchitectureError(LmcompressError):
    """The model's architecture has no adapter."""


class AssetError(LmcompressError):
    """A built-in asset could not be fetched or prepared."""


class DataError(LmcompressError):
    """A corpus or task could not be read."""


class TrainingDiverged(LmcompressError):
    """A loss turned NaN/infinite or spiked; checkpoints holding the weights that produced it are removed."""


class CheckpointError(LmcompressError):
    """A training checkpoint cannot be written or resumed (a write failed, a pickle, changed settings)."""


class OutputRefused(LmcompressError):
    """lmcompress will not write there: it would replace or delete something it did not write."""


class WriteFailed(LmcompressError):
    """Writing an output failed (a full disk, no permission); what was there before is untouched."""
