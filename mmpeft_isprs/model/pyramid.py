"""The DFM's per-modality pyramids for encoders other than SAM's ViT.

SAM's encoder gives one stride-16 map of 256 channels per modality, and the DFM builds a
:class:`~.dfm.SimplePyramid` from it. The other encoders give several maps of their own widths:

- :class:`MultiScaleProjection` (SAM2's Hiera: four stage maps at strides 4, 8, 16, 32): no
  pyramid, each map projected to the DFM's channels (1x1 conv + channel LayerNorm, as SAM's neck);
- :class:`BlockPyramid` (a timm ViT such as DINOv2: maps of chosen blocks, all at stride 16), a
  ViTDet-style simple feature pyramid: each map projected (1x1 conv + LayerNorm), then one map
  (the last block, as ViTDet) feeds all four levels of a :class:`~.dfm.SimplePyramid`, or four
  maps (four blocks, shallow to deep) feed one level each (4x up, 2x up, as is, 2x2 max-pool).

Both return ``[(B,C,H/4,W/4), (B,C,H/8,W/8), (B,C,H/16,W/16), (B,C,H/32,W/32)]`` for an input of
``(H, W)``, ``C`` = the DFM's channels; the SE fusions and the decoder are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .dfm import LayerNorm2dChannels, PyramidNorm, SimplePyramid

__all__ = ["MultiScaleProjection", "BlockPyramid", "projection"]


def projection(in_channels: int, channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + channel LayerNorm: ``(B, in_channels, h, w) -> (B, channels, h, w)``."""
    return nn.Sequential(nn.Conv2d(in_channels, channels, kernel_size=1, bias=False), LayerNorm2dChannels(channels))


def _check(maps: Sequence[Tensor], in_channels: Sequence[int], who: str) -> None:
    got = [tuple(m.shape) for m in maps]
    if len(maps) != len(in_channels) or any(m.dim() != 4 or m.shape[1] != c for m, c in zip(maps, in_channels)):
        raise ValueError(f"{who} expects {len(in_channels)} maps (B, C, h, w) with C = {list(in_channels)}; got {got}")


class MultiScaleProjection(nn.Module):
    """Four multi-scale maps, each projected to ``channels`` (SAM2's Hiera into the DFM).

    Args:
        in_channels: the four maps' channels, finest first (Hiera tiny: 96, 192, 384, 768).
        channels: the DFM's channels.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(
                f"MultiScaleProjection takes four maps (strides 4, 8, 16, 32); got channels {list(in_channels)}"
            )
        self.in_channels = tuple(int(c) for c in in_channels)
        self.channels = channels
        self.proj = nn.ModuleList(projection(c, channels) for c in self.in_channels)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """maps: [(B, C_i, H/s_i, W/s_i)], s = 4, 8, 16, 32 -> the same grids with ``channels`` each."""
        _check(maps, self.in_channels, "MultiScaleProjection")
        return [p(m) for p, m in zip(self.proj, maps)]


class BlockPyramid(nn.Module):
    """ViTDet-style simple pyramid from the stride-16 maps of one or four ViT blocks.

    Args:
        in_channels: the ViT's width.
        num_maps: 1 (the last block feeds every level, as ViTDet) or 4 (one block per level).
        channels: the DFM's channels.
        norm: the norm inside the 4x branch of the :class:`SimplePyramid` (``dfm_norms``).
    """

    def __init__(self, in_channels: int, num_maps: int, channels: int = 256, norm: PyramidNorm = "layernorm") -> None:
        super().__init__()
        if num_maps not in (1, 4):
            raise ValueError(f"a ViT pyramid takes the maps of 1 or 4 blocks (model.pyramid_blocks); got {num_maps}")
        self.in_channels = (int(in_channels),) * num_maps
        self.channels = channels
        self.proj = nn.ModuleList(projection(in_channels, channels) for _ in range(num_maps))
        self.pyramid = SimplePyramid(channels, norm)

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        """maps: 1 or 4 x (B, D, h, w), h, w = H/16, W/16 -> [(B,C,4h,4w), (B,C,2h,2w), (B,C,h,w), (B,C,h//2,w//2)]."""
        _check(maps, self.in_channels, "BlockPyramid")
        xs = [p(m) for p, m in zip(self.proj, maps)]  # (B, C, h, w) each
        if len(xs) == 1:
            return self.pyramid(xs[0])
        p = self.pyramid
        return [p.fpn1(xs[0]), p.fpn2(xs[1]), p.fpn3(xs[2]), p.fpn4(xs[3])]
