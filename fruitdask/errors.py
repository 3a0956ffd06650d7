"""Exceptions raised by fruitdask. Each message names the bad value and the fix."""

from __future__ import annotations


class FruitdaskError(Exception):
    """Base class: the CLI turns these into one clean line and a non-zero exit."""

    exit_code = 1


class ConfigError(FruitdaskError):
    """A flag, environment variable or default has an unusable value."""

    exit_code = 2


class InputError(FruitdaskError):
    """The input location is missing, empty or unreadable."""


class KeyCollisionError(InputError):
    """Two listed files would have the same image key: refused before anything is written."""


class TooManyRemovalsError(InputError):
    """The listing misses more of the table than ``--max-remove-fraction`` allows: nothing is removed."""


class OutputError(FruitdaskError):
    """The output location exists, is not writable, or could not be committed."""


class OutputBusyError(OutputError):
    """Another run holds the output's lock: two runs must never write one output at once."""


class ConcurrentRunError(OutputError):
    """Another run committed to the features table while this one worked; nothing of this run was committed."""


class DuplicateKeyError(OutputError):
    """A commit would hold an image key twice: refused, nothing committed."""


class SettingsMismatchError(OutputError):
    """The table's features were made with other settings than this run's."""


class TableFormatError(OutputError):
    """The table was written in another format than this fruitdask writes (a newer one: upgrade)."""


class WeightsError(FruitdaskError):
    """Model weights could not be loaded or do not fit the VGG16 graph."""


class CalibrationError(WeightsError):
    """int8's recorded calibration images can no longer be read."""


class StorageError(FruitdaskError):
    """A storage call failed (bucket missing, access denied, endpoint unreachable)."""


class RegionError(StorageError):
    """A bucket lives outside the allowed regions."""


class UntrustedReferenceError(StorageError):
    """A stored reference (weights in ``run.json``/``bundle.json``, a thumbnail path) points
    at a protocol fruitdask does not read, or at data whose hash does not match."""


class ClusterError(FruitdaskError):
    """The Dask/Spark cluster could not be started or reached."""


class ReductionError(FruitdaskError):
    """The PCA cannot be fitted with the requested settings."""


class TooManyErrors(FruitdaskError):
    """More images failed than ``--max-errors`` allows."""

    exit_code = 3


class ModelError(FruitdaskError):
    """A classifier bundle is missing or corrupt, or does not match the features it is given."""
