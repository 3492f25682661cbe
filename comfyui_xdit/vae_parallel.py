"""Exact VAE decode and encode over a group of ranks, split by image rows.

Works on ComfyUI's image autoencoders built from comfy.ldm.modules.diffusionmodules.model's Encoder and Decoder
(the SD1.x/SDXL 4-channel and Flux/SD3 16-channel VAEs) and on the Wan 2.1 / Wan 2.2 causal video VAEs, whose
row-mixing layers have their twins in vae_parallel_wan (each frame split by rows; frames walked as the stock code
walks them). Each call walks a shallow copy of the VAE's module tree
that shares every weight with it and swaps in row-parallel twins of the layers that mix rows: 3x3 convolutions
exchange halo rows (parallel_core.spatial_conv), group norms reduce their statistics over all ranks, the strided
downsampling convolution takes one row from below, and the mid-block attention (lowest resolution) takes each
rank's rows as queries against the gathered keys and values. Everything else (1x1 convolutions, activations, nearest upsampling, the latent scale) acts on each
row alone, so the stock forward code runs unchanged on each rank's band and the result is the stock one to fp32
rounding. The VAE itself is never modified.
"""
from __future__ import annotations

import copy

import torch

from parallel_core.spatial_conv import RowGroup, all_gather_rows, edge_rows, group_norm, halo_exchange, split_rows

# Where the rows lie in what each kind returns: images (..., rows, columns, channels), latents (..., rows, columns).
ROWS_DIM = {"decode": -3, "encode": -2}
CAUSAL_FRAMES = 4  # the Wan VAEs' frames per latent frame after the first


def _model_classes():
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.ldm.modules.diffusionmodules.model as model

    return autoencoder, model


def unsupported_reason(vae) -> str | None:
    """Why this VAE cannot be split by rows (None when it can)."""
    from .vae_parallel_wan import wan_vae_classes

    autoencoder, model = _model_classes()
    stage = getattr(vae, "first_stage_model", None)
    if isinstance(stage, wan_vae_classes()):
        return None
    if not isinstance(stage, autoencoder.AutoencodingEngine):
        return (f"its model is {type(stage).__name__}; row-parallel VAE supports ComfyUI's 2-D AutoencoderKL VAEs "
                "(SD1.x, SDXL, SD3, Flux) and the Wan 2.1 / Wan 2.2 video VAEs")
    for part in (stage.encoder, stage.decoder):
        if not isinstance(part, (model.Encoder, model.Decoder)) or getattr(part, "carried", False):
            return f"its {type(part).__name__} is not the 2-D image Encoder/Decoder"
        for module in part.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose2d)):
                return f"its {type(part).__name__} has {type(module).__name__} layers (a video VAE)"
    return None


class _HaloConv2d(torch.nn.Module):
    """A stride-1 convolution fed its neighbours' halo rows. The stock convolution runs on the band as it is (zero
    rows stand in for the halos) and only the `halo` output rows at each inner edge are computed again from the
    received rows: no copy of the whole band."""

    def __init__(self, conv: torch.nn.Conv2d, rows: RowGroup):
        super().__init__()
        self.halo = conv.padding[0]
        self.conv = conv
        self.valid_rows = copy.copy(conv)  # shares the weights; pads only the width
        self.valid_rows.padding = (0, conv.padding[1])
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halo, rows = self.halo, self.rows
        if x.shape[-2] < 2 * halo:
            return self.valid_rows(halo_exchange(x, halo, halo, rows))
        above, below = edge_rows(x, halo, halo, rows)
        out = self.conv(x)
        if rows.rank > 0:
            out[..., :halo, :] = self.valid_rows(torch.cat([above, x[..., :2 * halo, :]], dim=-2))
        if rows.rank < rows.size - 1:
            out[..., -halo:, :] = self.valid_rows(torch.cat([x[..., -2 * halo:, :], below], dim=-2))
        return out


class _RowDownsample(torch.nn.Module):
    """Pad-right-and-bottom then a 3x3 stride-2 convolution (Downsample's, Wan's Resample's), on a band that starts
    on an even row: the band's outputs need one row below it (the zero pad row on the last rank)."""

    def __init__(self, conv: torch.nn.Conv2d, rows: RowGroup):
        super().__init__()
        self.conv = conv
        self.rows = rows

    def forward(self, x: torch.Tensor, conv_carry_in=None, conv_carry_out=None) -> torch.Tensor:
        _, below = edge_rows(x, 0, 1, self.rows)
        # One padded copy, as the stock pad makes: the band, the row from below, a zero column on the right.
        padded = x.new_zeros(*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1)
        padded[..., :-1, :-1] = x
        padded[..., -1:, :-1] = below
        return self.conv(padded)


class _RowGroupNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.GroupNorm, rows: RowGroup):
        super().__init__()
        self.norm = norm
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import comfy.ops

        norm = self.norm
        if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) or getattr(norm, "bias_function", None):
            weight, bias, offload_stream = comfy.ops.cast_bias_weight(norm, x, offloadable=True)
            out = group_norm(x, norm.num_groups, weight, bias, norm.eps, self.rows)
            comfy.ops.uncast_bias_weight(norm, weight, bias, offload_stream)
            return out
        return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, self.rows)


class _RowAttention(torch.nn.Module):
    """AttnBlock's forward with this rank's rows as queries against every rank's keys and values (gathered at the
    lowest resolution), so each rank holds 1/P of the attention matrix."""

    def __init__(self, attn: torch.nn.Module, rows: RowGroup):
        super().__init__()
        self.attn = attn
        self.norm = _RowGroupNorm(attn.norm, rows)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        h = self.norm(x)
        q, k, v = attn.q(h), attn.k(h), attn.v(h)
        k = all_gather_rows(k, self.rows)
        v = all_gather_rows(v, self.rows)
        return x + attn.proj_out(local_query_attention(attn.optimized_attention, q, k, v))


def local_query_attention(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The VAE's own attention function with fewer queries than keys; output shaped like `q`."""
    _, model = _model_classes()
    if attention is model.normal_attention:
        # Its output buffer takes the keys' shape; slice_attention itself handles any number of queries.
        b, c = q.shape[:2]
        out = model.slice_attention(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1), v.reshape(b, c, -1))
        return out[:, :, :q[0, 0].numel()].reshape(q.shape)
    return attention(q, k, v)  # pytorch_attention and xformers_attention take any key length


def _padded_strided_conv(module: torch.nn.Module) -> torch.nn.Conv2d | None:
    """The convolution of a Sequential(ZeroPad2d((0, 1, 0, 1)), 3x3 stride-2 Conv2d) (Wan's downsampling)."""
    if not isinstance(module, torch.nn.Sequential) or len(module) != 2:
        return None
    pad, conv = module
    if (isinstance(pad, torch.nn.ZeroPad2d) and tuple(pad.padding) == (0, 1, 0, 1) and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.stride == (2, 2) and conv.padding == (0, 0)):
        return conv
    return None


def row_parallel_copy(module: torch.nn.Module, rows: RowGroup) -> torch.nn.Module:
    """A copy of `module`'s tree sharing all its weights, with row-mixing layers replaced by row-parallel twins."""
    from .vae_parallel_wan import wan_twin

    _, model = _model_classes()
    if isinstance(module, model.AttnBlock):
        return _RowAttention(module, rows)
    if isinstance(module, model.Downsample) and module.with_conv:
        return _RowDownsample(module.conv, rows)
    strided = _padded_strided_conv(module)
    if strided is not None:
        return _RowDownsample(strided, rows)
    twin = wan_twin(module, rows)
    if twin is not None:
        return twin
    if isinstance(module, torch.nn.Conv2d):
        if module.kernel_size[0] == 1 and module.padding[0] == 0:
            return module
        if (module.stride[0] != 1 or module.dilation[0] != 1 or module.padding_mode != "zeros"
                or module.padding[0] != module.kernel_size[0] // 2 or module.kernel_size[0] % 2 == 0):
            raise ValueError(f"no row-parallel twin for this convolution: {module}")
        return _HaloConv2d(module, rows)
    if isinstance(module, torch.nn.GroupNorm):
        return _RowGroupNorm(module, rows)
    if isinstance(module, (torch.nn.Conv3d, torch.nn.ZeroPad2d)):
        raise ValueError(f"no row-parallel twin for this layer: {module}")
    twin = copy.copy(module)
    object.__setattr__(twin, "_modules", {name: None if child is None else row_parallel_copy(child, rows)
                                          for name, child in module._modules.items()})
    return twin


def _encoder_factor(vae) -> int:
    """Rows of pixels per latent row: each rank's band of pixels is a whole number of these, so every strided
    convolution's band starts on an even row."""
    return int(vae.spacial_compression_encode())


def _vae_name(vae) -> str:
    from .vae_parallel_wan import wan_vae_classes

    for name, cls in zip(("Wan 2.1 VAE", "Wan 2.2 VAE"), wan_vae_classes()):
        if isinstance(vae.first_stage_model, cls):
            return name
    return f"{type(vae.first_stage_model).__name__} VAE"


def _check_latent(vae, samples: torch.Tensor) -> None:
    """Refuse, before any work, a latent this VAE cannot decode, naming what to change."""
    if vae.latent_dim == 3 and samples.ndim != 5:
        raise ValueError(f"samples is a {samples.ndim}-D latent {tuple(samples.shape)}, but the {_vae_name(vae)} is a video VAE: "
                         "it decodes (batch, channels, frames, rows, columns) latents; give it the latent of a video model")
    if samples.shape[1] != vae.latent_channels:
        raise ValueError(f"samples has {samples.shape[1]} channels, but the {_vae_name(vae)} decodes latents of "
                         f"{vae.latent_channels}: load the VAE that belongs to the model that made this latent")


def _clip_frames(vae, pixels: torch.Tensor) -> int | None:
    """The frames a video VAE encodes `pixels` as (images are the frames of one clip); None for an image VAE."""
    if vae.latent_dim != 3 or vae.not_video:
        return None
    return pixels.shape[0] if pixels.ndim == 4 else pixels.shape[1]


def check_input(vae, kind: str, tensor: torch.Tensor) -> None:
    """Refuse, before any work (the node calls it before the job leaves for the pool), what this VAE cannot decode
    (`kind` "decode": a latent) or encode ("encode": pixels), naming what to change."""
    reason = unsupported_reason(vae)
    if reason is not None:
        raise ValueError(f"this VAE cannot {kind} in parallel: {reason}")
    if kind == "decode":
        _check_latent(vae, tensor[:, :, 0] if vae.latent_dim == 2 and tensor.ndim == 5 else tensor)
        return
    factor = _encoder_factor(vae)
    if vae.crop_input and min(tensor.shape[-3:-1]) < factor:
        raise ValueError(f"pixels of {tensor.shape[-3]} x {tensor.shape[-2]} are smaller than one latent pixel of the "
                         f"{_vae_name(vae)} ({factor} x {factor}): give it an image of at least {factor} x {factor}")
    frames = _clip_frames(vae, tensor)
    if frames is not None and (frames - 1) % CAUSAL_FRAMES:
        # The causal encoders take a first frame, then chunks of 4; stock drops the frames of an unfinished chunk.
        kept = frames - (frames - 1) % CAUSAL_FRAMES
        raise ValueError(f"the {_vae_name(vae)} encodes clips of 1 + 4k frames (1, 5, 9, ...), but pixels has {frames}: give it "
                         f"{kept} or {kept + CAUSAL_FRAMES} frames (stock VAE Encode would drop the last {frames - kept} without a word)")


def join_pieces(kind: str, pieces: list[torch.Tensor | None]) -> torch.Tensor:
    """What the stock `vae.decode` / `vae.encode` returns, from every rank's piece (in rank order) of a `kind` job."""
    present = [piece for piece in pieces if piece is not None]
    return present[0] if len(present) == 1 else torch.cat(present, dim=ROWS_DIM[kind])


def decode(vae, samples: torch.Tensor, rows: RowGroup) -> torch.Tensor | None:
    """This rank's rows of what `vae.decode(samples)` returns, computed by all ranks of `rows`; join_pieces joins
    them. No rank gathers the whole image: each hands its own rows to the caller.

    A video latent (batch, channels, frames, rows, columns) is split by rows the same way: every rank walks all
    frames. A latent with fewer rows than ranks is decoded by rank 0 alone (the others return None).
    """
    import comfy.model_management as mm

    check_input(vae, "decode", samples)
    if vae.latent_dim == 2 and samples.ndim == 5:
        samples = samples[:, :, 0]
    if samples.shape[-2] < rows.size:
        return vae.decode(samples) if rows.rank == 0 else None
    start, stop = split_rows(samples.shape[-2], rows.size)[rows.rank]
    band = samples[..., start:stop, :]
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(band.shape, vae.vae_dtype),
                       force_full_load=vae.disable_offload)
    model = row_parallel_copy(vae.first_stage_model, rows)
    with torch.inference_mode():
        out = model.decode(band.to(device=vae.device, dtype=vae.vae_dtype))
        out = out.to(device=vae.output_device, dtype=vae.vae_output_dtype())
        vae.process_output(out)
    return out.movedim(1, -1)


def encode(vae, pixels: torch.Tensor, rows: RowGroup) -> torch.Tensor | None:
    """This rank's latent rows of what `vae.encode(pixels)` returns, computed by all ranks of `rows`; join_pieces
    joins them.

    A video VAE takes the images as the frames of one clip, as the stock encode does. Pixels with fewer latent rows
    than ranks are encoded by rank 0 alone (the others return None).
    """
    import comfy.model_management as mm

    check_input(vae, "encode", pixels)
    factor = _encoder_factor(vae)
    pixels = vae.vae_encode_crop_pixels(pixels)
    if pixels.shape[-3] // factor < rows.size:
        return vae.encode(pixels) if rows.rank == 0 else None
    pixels = pixels.movedim(-1, 1)
    if vae.latent_dim == 3 and pixels.ndim < 5:  # as the stock encode: images are the frames of one clip
        pixels = pixels.unsqueeze(2) if vae.not_video else pixels.movedim(1, 0).unsqueeze(0)
    start, stop = split_rows(pixels.shape[-2], rows.size, multiple=factor)[rows.rank]
    band = pixels[..., start:stop, :]
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(band.shape, vae.vae_dtype),
                       force_full_load=vae.disable_offload)
    model = row_parallel_copy(vae.first_stage_model, rows)
    with torch.inference_mode():
        out = model.encode(vae.process_input(band).to(vae.vae_dtype).to(vae.device).contiguous())
        out = out.to(vae.output_device).to(dtype=vae.vae_output_dtype())
    # Only SeedVR2's VAE (not split here) sets format_encoded in ComfyUI 0.30.0; it scales each element.
    return out if vae.format_encoded is None else vae.format_encoded(out)
