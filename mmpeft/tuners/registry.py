"""The one place a method is named: its config, its layer and how a layer is built from a rule.

``wrap_multimodal(method=...)``, :class:`~mmpeft.MultimodalConfig` (a rule's ``kind``) and
option checking all read :data:`METHODS`; a new method registers one :class:`Method`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import MmpeftTypeError, MmpeftValueError
from ..utils import register
from .base import MultimodalLayer

__all__ = ["Method", "METHODS", "register_method", "get_method", "method_of"]


@dataclass(frozen=True)
class Method:
    """One multimodal method.

    Attributes:
        name: the method's name (``method=`` of ``wrap_multimodal``, ``kind`` of its rules).
        config: its rule dataclass (``targets`` plus the method's options as fields).
        layer: its :class:`~mmpeft.tuners.base.MultimodalLayer` subclass.
        build: ``build(rule, module, name, modalities)``: the layer wrapping ``module``.
        wraps: module types the layer can wrap (None: any module).
        preset: the preset used when neither ``targets`` nor ``preset`` is given.
    """

    name: str
    config: type
    layer: type[MultimodalLayer]
    build: Callable[[Any, nn.Module, str, Sequence[str]], MultimodalLayer]
    wraps: tuple[type[nn.Module], ...] | None
    preset: str

    def options(self) -> list[str]:
        """The option names the method takes: its config's fields but ``targets`` and ``kind``."""
        return [f.name for f in dataclasses.fields(self.config) if f.name not in ("targets", "kind")]


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS` under its name and return it; a name taken by another
    method is an error naming it unless ``replace=True`` (:func:`mmpeft.utils.register`)."""
    if not isinstance(method, Method):
        raise MmpeftTypeError(f"register_method takes a Method, got {type(method).__name__}")
    return register(METHODS, method.name, method, kind="method", replace=replace)


def get_method(name: Any) -> Method:
    """The registered method called ``name``; ValueError listing the known ones."""
    if not isinstance(name, str):
        raise MmpeftTypeError(f"method must be a method's name (a str), got {type(name).__name__}: {name!r}")
    if name not in METHODS:
        raise MmpeftValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def method_of(rule: Any) -> Method:
    """The method a rule config belongs to (by its type)."""
    for method in METHODS.values():
        if isinstance(rule, method.config):
            return method
    raise MmpeftTypeError(f"{type(rule).__name__} is the config of no registered method ({sorted(METHODS)})")
