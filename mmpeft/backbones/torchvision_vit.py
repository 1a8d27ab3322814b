"""torchvision's VisionTransformer with an attention whose projections are called, not read.

``nn.MultiheadAttention`` passes ``in_proj_weight`` and ``out_proj.weight`` to
``F.multi_head_attention_forward``: a LoRA wrapped around its ``out_proj`` would never be called
(and no ``nn.Linear`` holds the qkv projection at all). :class:`ExplicitMultiheadAttention`
computes the same function with the in-projection as an ``nn.Linear`` (``in_proj``) and calls
both projections, so multimodal layers placed on them act. Its state-dict keys are those of
``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``,
``out_proj.bias``): torchvision checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MmpeftValueError

__all__ = ["ExplicitMultiheadAttention", "make_attention_explicit"]

_RENAMES = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed, equal q/k/v dims, no bias_kv / zero_attn) with
    explicit projection modules.

    Attributes:
        in_proj: ``nn.Linear(E, 3E)``, rows q, k, v (the parameters of ``in_proj_weight``).
        out_proj: the original output projection.
    """

    def __init__(
        self, in_proj: nn.Linear, out_proj: nn.Linear, num_heads: int, dropout: float = 0.0, batch_first: bool = False
    ) -> None:
        super().__init__()
        e = out_proj.in_features
        if in_proj.in_features != e or in_proj.out_features != 3 * e or e % num_heads != 0:
            raise MmpeftValueError(f"in_proj {in_proj} does not fit embed_dim {e} with {num_heads} heads")
        self.in_proj, self.out_proj = in_proj, out_proj
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = e, num_heads, dropout, batch_first
        self.register_state_dict_post_hook(_save_hook)
        self.register_load_state_dict_pre_hook(_load_hook)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> ExplicitMultiheadAttention:
        """The equivalent of ``mha``, sharing its parameter tensors."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise MmpeftValueError("only packed nn.MultiheadAttention without bias_k/bias_v/add_zero_attn is supported")
        w = mha.in_proj_weight
        lin = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta")
        lin.weight = w  # the same Parameter objects: frozen state and checkpoint values carry over
        if mha.in_proj_bias is not None:
            lin.bias = mha.in_proj_bias
        return cls(lin, mha.out_proj, mha.num_heads, mha.dropout, mha.batch_first)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query: (B, L, E) if ``batch_first`` else (L, B, E); key, value: (B, S, E) / (S, B, E).

        Returns ``(output, weights)`` as ``nn.MultiheadAttention``: weights (B, L, S) averaged over
        heads, (B, h, L, S) otherwise, or None unless ``need_weights``.
        """
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, L, E)
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, -1)  # (B, L, E) each
        else:  # cross-attention: every input through the called projection, its third kept
            q, k, v = (self.in_proj(t)[..., i * e : (i + 1) * e] for i, t in enumerate((query, key, value)))
        b, l_q, l_k = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, self.num_heads, e // self.num_heads).transpose(1, 2) for t in (q, k, v))
        mask = _additive_mask(attn_mask, key_padding_mask, b, self.num_heads, l_q, l_k, q.dtype)
        p = self.dropout if self.training else 0.0
        causal = is_causal and mask is None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / (q.shape[-1] ** 0.5)  # (B, h, L, S)
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(torch.ones(l_q, l_k, dtype=torch.bool, device=q.device).triu(1), -torch.inf)
            w = scores.softmax(-1)
            out = F.dropout(w, p, self.training) @ v  # (B, h, L, d)
            weights: torch.Tensor | None = w.mean(1) if average_attn_weights else w
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(b, l_q, e))  # (B, L, E)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _additive_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    b: int,
    h: int,
    lq: int,
    lk: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (bool: True = not attended; float: added) as one float
    mask broadcastable to (B, h, L, S)."""

    def as_float(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -torch.inf)
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        am = as_float(attn_mask)
        mask = am.view(b, h, lq, lk) if am.dim() == 3 else am  # (B*h, L, S) -> (B, h, L, S); (L, S) broadcasts
    if key_padding_mask is not None:
        kp = as_float(key_padding_mask).view(b, 1, 1, lk)  # (B, S) -> (B, 1, 1, S)
        mask = kp if mask is None else mask + kp
    return mask


def _save_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    names = {prefix + new: prefix + old for new, old in _RENAMES}
    if not names.keys() & state.keys():
        return
    items = list(state.items())
    state.clear()  # rebuilt in order: in_proj_weight, in_proj_bias, out_proj.* as nn.MultiheadAttention
    state.update((names.get(k, k), v) for k, v in items)


def _load_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    if type(module.in_proj) is not nn.Linear:
        return  # wrapped: the keys are the wrapper's own
    for new, old in _RENAMES:
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)


def make_attention_explicit(model: nn.Module) -> list[str]:
    """Swap every ``nn.MultiheadAttention`` of torchvision's ViT encoder blocks (their
    ``self_attention``) for :class:`ExplicitMultiheadAttention`, in place; returns the names."""
    swapped = []
    for name, block in model.named_modules():
        attn = getattr(block, "self_attention", None)
        if type(block).__name__ == "EncoderBlock" and isinstance(attn, nn.MultiheadAttention):
            block.self_attention = ExplicitMultiheadAttention.from_torch(attn)
            swapped.append(f"{name}.self_attention" if name else "self_attention")
    return swapped
