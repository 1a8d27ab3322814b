"""One family for every refusal and warning mmpeft gives.

Catch :class:`MmpeftError` to catch "mmpeft refused this" in one clause; each refusal is also
an instance of the built-in exception it has always been documented as, so existing
``except ValueError`` / ``except TypeError`` / ``except KeyError`` clauses keep working:

================================  ==========================================================
class                             raised when
================================  ==========================================================
:class:`MmpeftValueError`         a value is refused: an argument, an option, a config, the
                                  content of a file (every wrap-time refusal is one)
:class:`MmpeftTypeError`          an argument of the wrong kind
:class:`MmpeftKeyError`           a name that does not exist (modality, adapter set, key)
:class:`MmpeftStateError`         an operation refused in the model's current state (an
                                  unloaded wrapper, a merged layer); also a ``RuntimeError``
:class:`MmpeftFileNotFoundError`  a file or folder that is not there
================================  ==========================================================

The named errors of the subpackages (``MergeError``, ``NonFiniteInputError``, ``StructureError``,
``ProbeError``, ``WrapError``, ...) derive from these. Every warning derives from
:class:`MmpeftWarning` (a ``UserWarning``), so ``warnings.filterwarnings("error",
category=MmpeftWarning)`` turns all of them into errors.

This module imports nothing of mmpeft: every floor may raise these.
"""

from __future__ import annotations

__all__ = [
    "MmpeftError",
    "MmpeftFileNotFoundError",
    "MmpeftKeyError",
    "MmpeftStateError",
    "MmpeftTypeError",
    "MmpeftValueError",
    "MmpeftWarning",
]


class MmpeftError(Exception):
    """Base of every refusal mmpeft raises."""


class MmpeftValueError(MmpeftError, ValueError):
    """A value refused: an argument, option, config or file content."""


class MmpeftTypeError(MmpeftError, TypeError):
    """An argument of the wrong kind."""


class MmpeftKeyError(MmpeftError, KeyError):
    """A name that does not exist (modality, adapter set, state-dict key).

    Printed as its message (a plain ``KeyError`` prints the ``repr`` of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class MmpeftStateError(MmpeftError, RuntimeError):
    """An operation refused in the model's current state (unloaded, merged, already wrapped)."""


class MmpeftFileNotFoundError(MmpeftError, FileNotFoundError):
    """A file or folder that is not there."""


class MmpeftWarning(UserWarning):
    """Base of every warning mmpeft gives."""
