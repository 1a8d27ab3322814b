"""One error family: every exception mmpeft raises on a refusal derives from ``MmpeftError``
(and stays the built-in it is documented as), every warning from ``MmpeftWarning``.

The package is walked on its source: each ``raise`` names a class (or a call of one) that is
resolved in its module; a bare built-in (``raise ValueError(...)``) fails the test.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mmpeft
from mmpeft import MmpeftError, MmpeftKeyError, MmpeftStateError, MmpeftValueError, MmpeftWarning, wrap_multimodal
from tests.tiny_models import tiny_timm_vit

ROOT = Path(mmpeft.__file__).parent

#: raises that are not refusals: abstract hooks and control flow caught inside the package
NOT_REFUSALS = {
    ("mmpeft.tuners.base", "NotImplementedError"),  # abstract hooks of MultimodalLayer
    ("mmpeft.tuners.fusion", "NotImplementedError"),  # abstract hook of Fusion
    ("mmpeft.targeting.inputs", "_Stop"),  # stops a forward early; caught in the same module
}


def _modules() -> list[str]:
    names = ["mmpeft"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="mmpeft."):
        names.append(info.name)
    return names


def _raised_names(node: ast.expr | None) -> list[str]:
    """The class names a ``raise`` expression can raise (a call's callee, both arms of an if)."""
    if node is None:
        return []
    if isinstance(node, ast.Call):
        return _raised_names(node.func)
    if isinstance(node, ast.IfExp):
        return _raised_names(node.body) + _raised_names(node.orelse)
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [ast.unparse(node)]
    return []


def _raises(module: str) -> list[tuple[int, str]]:
    path = ROOT.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    caught: set[str] = set()  # names bound by ``except ... as name``: re-raises
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.name:
            caught.add(node.name)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for name in _raised_names(node.exc):
                if name not in caught:
                    out.append((node.lineno, name))
    return out


def test_every_raise_in_the_package_is_of_the_family() -> None:
    wrong = []
    for module in _modules():
        mod = importlib.import_module(module)
        for line, name in _raises(module):
            if (module, name) in NOT_REFUSALS:
                continue
            obj = getattr(mod, name.split(".")[0], None)
            for part in name.split(".")[1:]:
                obj = getattr(obj, part, None)
            if inspect.isfunction(obj):  # a helper that builds the exception: what it returns
                hint = inspect.signature(obj).return_annotation
                obj = getattr(mod, hint, None) if isinstance(hint, str) else hint
            if not (inspect.isclass(obj) and issubclass(obj, MmpeftError)):
                wrong.append(f"{module}:{line} raises {name}")
    assert not wrong, "raises outside the MmpeftError family:\n" + "\n".join(wrong)


def test_every_exception_and_warning_class_defined_is_of_the_family() -> None:
    wrong = []
    for module in _modules():
        for name, obj in vars(importlib.import_module(module)).items():
            if not inspect.isclass(obj) or obj.__module__ != module or (module, name) in NOT_REFUSALS:
                continue
            if issubclass(obj, Warning) and not issubclass(obj, MmpeftWarning):
                wrong.append(f"{module}.{name} (a warning)")
            elif issubclass(obj, Exception) and not issubclass(obj, Warning) and not issubclass(obj, MmpeftError):
                wrong.append(f"{module}.{name}")
    assert not wrong, wrong


def test_the_family_is_exported_and_keeps_the_builtin_classes() -> None:
    from mmpeft.runtime.verify import WrapError
    from mmpeft.targeting.probe import ProbeError

    assert {"MmpeftError", "MmpeftValueError", "MmpeftWarning"} <= set(mmpeft.__all__)
    for cls in (WrapError, ProbeError):  # wrap-time refusals: ValueErrors, and RuntimeErrors as before
        assert issubclass(cls, MmpeftValueError) and issubclass(cls, ValueError) and issubclass(cls, RuntimeError)
    assert str(MmpeftKeyError("no set 'x'")) == "no set 'x'"  # not KeyError's repr


def test_one_clause_catches_refusals_of_every_kind() -> None:
    caught = []
    for call in (
        lambda: wrap_multimodal(tiny_timm_vit(), ("optical",), "no-such-method"),  # a value
        lambda: wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora").set_adapter("nope"),  # a name
        lambda: wrap_multimodal(nn.Linear(2, 2), ("optical",), "lora"),  # a model without blocks
    ):
        with pytest.raises(MmpeftError) as info:
            call()
        caught.append(type(info.value))
    assert caught[0] is not caught[1] or issubclass(caught[0], ValueError)


def test_unloaded_wrapper_refuses_with_a_state_error() -> None:
    w = wrap_multimodal(tiny_timm_vit(), ("optical", "dsm"), "lora")
    w.unload()
    with pytest.raises(MmpeftStateError):
        w({"optical": torch.rand(1, 3, 32, 32)})


def test_warnings_are_of_the_family() -> None:
    from mmpeft.targeting.coverage import CoverageWarning
    from mmpeft.targeting.probe import ProbeWarning
    from mmpeft.targeting.structure import StructuralFamilyWarning

    for cls in (CoverageWarning, ProbeWarning, StructuralFamilyWarning):
        assert issubclass(cls, MmpeftWarning) and issubclass(cls, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MmpeftWarning)
        with pytest.raises(MmpeftWarning):
            warnings.warn("x", ProbeWarning, stacklevel=1)


def test_a_name_of_the_wrong_type_is_a_type_error_naming_the_field() -> None:
    """A list or a config where a registered name is expected gave Python's bare 'unhashable type'."""
    from mmpeft import AdapterConfig, LoRAConfig
    from mmpeft.errors import MmpeftTypeError

    with pytest.raises(MmpeftTypeError, match="fusion must be a fusion rule's name"):
        LoRAConfig(targets=["qkv"], fusion=["scalar"])  # type: ignore[arg-type]
    with pytest.raises(MmpeftTypeError, match="activation must be a name"):
        AdapterConfig(targets=["mlp"], activation=["gelu"])  # type: ignore[arg-type]
    with pytest.raises(MmpeftTypeError, match="method must be a method's name"):
        wrap_multimodal(tiny_timm_vit(), ("a", "b"), {"kind": "lora"})  # type: ignore[arg-type]
