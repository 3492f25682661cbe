"""Row-parallel twins of the layers of ComfyUI's Wan 2.1 and Wan 2.2 causal video VAEs (comfy.ldm.wan.vae, vae2_2).

Every activation is (batch, channels, frames, rows, columns) and each rank holds a band of rows of every frame. The
stock encoder and decoder walk the clip in chunks of frames, keeping each causal convolution's last input frames in
a cache list: those caches are taken from the band, so each rank's cache holds its own rows and the stock chunking
runs unchanged. A causal 3-D convolution exchanges halo rows of both the cached frames and the chunk; the RMS norms
(over channels), the temporal convolutions, nearest upsampling and Wan 2.2's (un)patchify and pixel-shuffle
shortcuts act on each row alone. The mid-block attention mixes all rows of a frame: each rank's rows are the
queries against every rank's keys and values, gathered (the lowest resolution, the smallest tensors).
"""
from __future__ import annotations

import copy
import functools

import torch

from parallel_core.spatial_conv import RowGroup, all_gather_rows, edge_rows, halo_exchange


def _wan_modules():
    import comfy.ldm.wan.vae as wan21
    import comfy.ldm.wan.vae2_2 as wan22

    return wan21, wan22


def wan_vae_classes() -> tuple[type, ...]:
    """The first_stage_model classes of the Wan 2.1 and Wan 2.2 VAEs."""
    wan21, wan22 = _wan_modules()
    return wan21.WanVAE, wan22.WanVAE


@functools.cache
def _halo_causal_conv_class() -> type:
    wan21, _ = _wan_modules()

    class HaloCausalConv3d(wan21.CausalConv3d):
        """CausalConv3d (it stays one: the stock blocks test for it to pass the frame cache) whose row padding is
        its neighbours' rows of the cached frames and of the chunk. One buffer holds the zero frames, the cache, the
        chunk and the halos, as the stock forward's one concatenation holds the first three."""

        rows: RowGroup
        halo: int

        def forward(self, x, cache_x=None, cache_list=None, cache_idx=None):
            if cache_list is not None:
                cache_x = cache_list[cache_idx]
                cache_list[cache_idx] = None
            conv3d = super(wan21.CausalConv3d, self).forward
            if cache_x is None and x.shape[2] == 1:  # the stock fast path: the kernel cut to its last frame
                return conv3d(halo_exchange(x, self.halo, self.halo, self.rows), autopad="causal_zero")
            if self._padding == 0:
                cache_x = None  # the stock forward ignores the cache then
            cached = 0 if cache_x is None else cache_x.shape[2]
            zero_frames = max(0, self._padding - cached)
            b, c, t, h, w = x.shape
            halo = self.halo
            full = x.new_zeros(b, c, zero_frames + cached + t, h + 2 * halo, w)
            band = full[:, :, zero_frames:, halo:halo + h]
            if cache_x is not None:
                band[:, :, :cached] = cache_x.to(x.device)
            band[:, :, cached:] = x
            del cache_x
            above, below = edge_rows(band, halo, halo, self.rows)
            full[:, :, zero_frames:, :halo] = above
            full[:, :, zero_frames:, halo + h:] = below
            return conv3d(full)

    return HaloCausalConv3d


def _halo_causal_conv(conv: torch.nn.Module, rows: RowGroup) -> torch.nn.Module:
    """A CausalConv3d sharing `conv`'s weights whose row padding is its neighbours' rows (zeros at the true edges)."""
    _, kernel_rows, _ = conv.kernel_size
    if (conv.stride[1] != 1 or conv.dilation[1] != 1 or conv.padding_mode != "zeros"
            or conv.padding[1] != kernel_rows // 2 or kernel_rows % 2 == 0):
        raise ValueError(f"no row-parallel twin for this causal convolution: {conv}")
    twin = copy.copy(conv)
    twin.__class__ = _halo_causal_conv_class()
    twin.padding = (conv.padding[0], 0, conv.padding[2])
    twin.halo = conv.padding[1]
    twin.rows = rows
    return twin


class _RowFrameAttention(torch.nn.Module):
    """The Wan AttentionBlock (single head over the rows x columns of each frame) with this rank's rows as queries
    against every rank's keys and values."""

    def __init__(self, attn: torch.nn.Module, rows: RowGroup):
        super().__init__()
        self.attn = attn
        self.rows = rows

    def forward(self, x: torch.Tensor, *cache_args, **cache_kwargs) -> torch.Tensor:
        from .vae_parallel import local_query_attention

        attn = self.attn
        b, c, t, h, w = x.shape
        frames = attn.norm(x.movedim(2, 1).reshape(b * t, c, h, w))  # stock: 'b c t h w -> (b t) c h w'
        q, k, v = attn.to_qkv(frames).chunk(3, dim=1)
        k = all_gather_rows(k, self.rows)
        v = all_gather_rows(v, self.rows)
        out = attn.proj(local_query_attention(attn.optimized_attention, q, k, v))
        return out.reshape(b, t, c, h, w).movedim(1, 2) + x


def wan_twin(module: torch.nn.Module, rows: RowGroup) -> torch.nn.Module | None:
    """The row-parallel twin of a Wan VAE layer that mixes rows, or None when `module` is not one."""
    wan21, _ = _wan_modules()
    if isinstance(module, wan21.CausalConv3d):
        return module if module.kernel_size[1] == 1 and module.padding[1] == 0 else _halo_causal_conv(module, rows)
    if isinstance(module, wan21.AttentionBlock):
        return _RowFrameAttention(module, rows)
    return None
