"""Where a wrapped model's LoRA lands in the plain model peft loads it onto (:func:`export_peft`).

Wrapping prepares the host (:func:`mmpeft.targeting.prepare.prepare_backbone`) so that every projection it
adapts is a called module. The plain model peft loads an adapter onto is not prepared, and two
preparations change what a peft LoRA there would do:

- timm attentions with q/v biases and ``qkv_bias_separate`` (EVA02's ``EvaAttention``, BEiT,
  Swin V2): the plain model computes ``F.linear(x, qkv.weight, qkv_bias)`` and never calls ``qkv``, so a peft LoRA on ``attn.qkv`` would never
  act (peft only warns). There is no other module to carry that update: :func:`place` refuses it
  unless the adapter is for the prepared model (``for_prepared_base``), which
  :func:`prepare_for_peft` builds from the plain one.
- torchvision's ``nn.MultiheadAttention`` becomes :class:`ExplicitMultiheadAttention` with an
  ``in_proj`` linear that the plain model lacks. Its LoRA maps onto peft's own LoRA for
  ``nn.MultiheadAttention`` (one module adapting ``in_proj_weight`` and ``out_proj``, merged into
  the weights for each forward): :func:`to_plain` writes the ``in_proj`` update as that module's
  pair and a zero ``out_proj`` pair. Refused there: an ``out_proj`` update (peft 0.21 adds it
  twice in the forward: merged into the weight, then again by its out_proj layer), DoRA (peft's
  MultiheadAttention LoRA has none) and ``lora_bias`` (its merge drops it); the last two are
  adapter-wide in peft, so any layer using them refuses. Dropout: exact in inference (in
  training peft's merged forward applies none there).

Any other module of mmpeft's preparation on a path (e.g. torchvision Swin's explicit window
attention) is refused unless ``for_prepared_base``; any other module of mmpeft's (a layer, a
module to save) is refused: the plain model cannot hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.torchvision_vit import ExplicitMultiheadAttention
from ..errors import MmpeftValueError
from ..targeting.prepare import prepare_backbone

__all__ = ["Exported", "Placement", "PlainModelError", "place", "prepare_for_peft", "to_plain"]

_MHA_PARTS = ("in_proj", "out_proj")
_PREPARED_HINT = (
    "Export with for_prepared_base=True and load the adapter onto the plain model prepared as wrapping "
    "prepares it: peft.PeftModel.from_pretrained(mmpeft.interop.peft_families.prepare_for_peft(plain_model), directory) "
    "(the same function and state dict as the plain model)."
)


class PlainModelError(MmpeftValueError):
    """An exported module would be missing from, or never called by, the plain model peft loads onto."""


def prepare_for_peft(model: nn.Module) -> nn.Module:
    """``model`` prepared in place as wrapping prepares it (:func:`mmpeft.targeting.prepare.prepare_backbone`:
    EVA02's ``qkv_bias_separate = True``, torchvision's explicit attention, norms in eval), returned.

    The function and the state-dict keys are unchanged; an adapter written by
    ``export_peft(..., for_prepared_base=True)`` loads onto it and computes the wrapped model's output.
    """
    prepare_backbone(model)
    return model


@dataclass
class Exported:
    """One module in peft form: A (R, in), B (out, R), peft alpha for scaling alpha / R.

    ``target``: the path is one of peft's ``target_modules`` (False: the ``out_proj`` part peft's
    MultiheadAttention LoRA creates itself, with its parent's rank and alpha)."""

    path: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    dropout: float
    bias: torch.Tensor | None = None  # (out,) lora_bias: B's bias
    magnitude: torch.Tensor | None = None  # (out,) DoRA's lora_magnitude_vector
    target: bool = True

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True)
class Placement:
    """Where a module of the wrapped model goes in the plain one: ``path`` itself (``part`` None),
    or ``part`` (``"in_proj"`` / ``"out_proj"``) of peft's MultiheadAttention LoRA at ``path``."""

    path: str
    part: str | None = None


def _from_mmpeft(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "mmpeft"


def _reads_qkv_weight(parent: nn.Module, name: str) -> bool:
    """``parent.<name>`` is a timm fused qkv (EVA02, BEiT, Swin V2: q/v biases, a
    ``qkv_bias_separate`` switch that wrapping turned on) whose plain model reads ``qkv.weight``."""
    return (
        type(parent).__module__.startswith("timm.")
        and name == "qkv"
        and getattr(parent, "q_bias", None) is not None
        and bool(getattr(parent, "qkv_bias_separate", False))
    )


def _refuse_mmpeft_ancestor(path: str, prefix: str, anc: nn.Module, child: str) -> PlainModelError:
    cls = type(anc).__name__
    if type(anc).__module__.startswith("mmpeft.backbones."):  # put there by mmpeft's preparation
        why = (
            "the plain model holds an nn.MultiheadAttention there, which reads its projections' weights"
            if (isinstance(anc, ExplicitMultiheadAttention))
            else "the plain model holds the original module there"
        )
        return PlainModelError(
            f"{path}: {prefix} is mmpeft's {cls}, which exists only after mmpeft's preparation (mmpeft.targeting.prepare); "
            f"{why} and does not call a {child!r} module, so a peft LoRA there would never act. {_PREPARED_HINT}"
        )
    return PlainModelError(
        f"{path}: {prefix} is mmpeft's {cls}, which the plain model does not hold; peft cannot place a module there"
    )


def place(base: nn.Module, path: str, prepared: bool, *, saved: bool = False) -> Placement:
    """Where module ``path`` of the wrapped (prepared) ``base`` goes in the plain model, or
    :class:`PlainModelError` naming why it cannot. ``prepared``: the adapter is for
    :func:`prepare_for_peft`'s model; ``saved``: a module to save (no MultiheadAttention mapping)."""
    parts = path.split(".")
    for i in range(1, len(parts)):  # the ancestors, the root (the user's model) excluded
        prefix = ".".join(parts[:i])
        anc = base.get_submodule(prefix)
        if not _from_mmpeft(anc) or (prepared and type(anc).__module__.startswith("mmpeft.backbones.")):
            continue  # the plain model's own module, or one that prepare_for_peft puts back
        if (
            isinstance(anc, ExplicitMultiheadAttention)
            and not saved
            and i == len(parts) - 1
            and parts[-1] in _MHA_PARTS
        ):
            return Placement(prefix, parts[-1])
        raise _refuse_mmpeft_ancestor(path, prefix, anc, parts[i])
    parent = base.get_submodule(".".join(parts[:-1]))
    if not prepared and _reads_qkv_weight(parent, parts[-1]):
        raise PlainModelError(
            f"{path}: the plain timm {type(parent).__name__} {'.'.join(parts[:-1])} (q/v biases, qkv_bias_separate "
            "False as timm builds it) computes F.linear(x, qkv.weight, qkv_bias) and never calls its qkv module, so "
            "a peft LoRA there would never act (peft only warns); wrapping set qkv_bias_separate = True "
            f"(mmpeft.targeting.prepare) so that qkv is called. {_PREPARED_HINT}"
        )
    return Placement(path)


def _mha_exports(base: nn.Module, path: str, parts: dict[str, Exported]) -> list[Exported]:
    """peft's MultiheadAttention LoRA at ``path`` from the ``in_proj`` export, its out_proj pair zero."""
    if "out_proj" in parts:
        raise PlainModelError(
            f"{parts['out_proj'].path}: peft's LoRA for nn.MultiheadAttention (which the plain model holds at "
            f"{path}) is the only way to adapt that out_proj, and peft (0.21) adds its out_proj update twice "
            "in the forward (merged into the weight, then merged again by the out_proj layer), so the update "
            f"cannot be carried exactly. {_PREPARED_HINT}"
        )
    e = parts["in_proj"]
    dim = base.get_submodule(path).embed_dim
    zero_a, zero_b = e.lora_a.new_zeros(e.rank, dim), e.lora_b.new_zeros(dim, e.rank)
    return [
        Exported(path, e.lora_a, e.lora_b, e.alpha, e.dropout),
        Exported(f"{path}.base_layer.out_proj", zero_a, zero_b, e.alpha, e.dropout, target=False),
    ]


def to_plain(base: nn.Module, exported: list[Exported], prepared: bool) -> list[Exported]:
    """``exported`` (paths of the wrapped model) placed in the plain model: unchanged paths, and
    each torchvision attention's ``in_proj`` / ``out_proj`` as peft's MultiheadAttention LoRA."""
    out: list[Exported] = []
    mha: dict[str, dict[str, Exported]] = {}
    for e in exported:
        p = place(base, e.path, prepared)
        if p.part is None:
            out.append(e)
        else:
            mha.setdefault(p.path, {})[p.part] = e
    odd = [e.path for e in exported if e.bias is not None or e.magnitude is not None]
    if mha and odd:  # peft's lora_bias / use_dora are adapter-wide: its MultiheadAttention LoRA would get them too
        raise PlainModelError(
            f"{odd[0]} uses lora_bias or DoRA, which peft sets for the whole adapter, and peft's LoRA for "
            f"nn.MultiheadAttention (which the plain model holds at {next(iter(mha))}) has no DoRA and merges "
            f"without lora_bias. {_PREPARED_HINT}"
        )
    for path, parts in mha.items():
        out.extend(_mha_exports(base, path, parts))
    return out
