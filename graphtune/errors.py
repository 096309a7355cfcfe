"""graphtune's exception types.

Every bad input raises one of these with a message naming what is wrong; callers can
catch :class:`GraphtuneError` to handle all of them.
"""
from __future__ import annotations


class GraphtuneError(Exception):
    """Base class of every error graphtune raises on purpose."""


class OptionError(GraphtuneError, ValueError):
    """An unknown or ill-typed option was passed to an entry point."""


class CaptureError(GraphtuneError):
    """A model could not be captured into graphtune's IR by the requested method."""


class VerificationError(GraphtuneError):
    """The IR verifier found a broken invariant (metadata out of sync, dangling node...)."""


class TranslationValidationError(GraphtuneError):
    """The rewritten graph computes something different from the original one."""


class ShapeError(GraphtuneError, ValueError):
    """Tensors handed to a graphtune op have shapes, dtypes or devices it cannot take."""


class DTypeError(ShapeError, TypeError):
    """Tensors handed to a graphtune op have dtypes it cannot take (integer inputs, mixed dtypes).

    A :class:`ShapeError` too, so ``except ShapeError`` still catches every bad-input error of an op.
    """


class PlanError(GraphtuneError, ValueError):
    """A runtime plan (sharing tree, work partition) is inconsistent with its inputs."""


class KernelError(GraphtuneError):
    """A generated kernel failed to compile or run; callers fall back to the reference."""


class TuningDBError(GraphtuneError):
    """The tuning database is unreadable, foreign or was asked for something impossible."""
