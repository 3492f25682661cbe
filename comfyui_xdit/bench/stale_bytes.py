"""Bytes one rank sends per model call for PipeFusion and displaced patch parallel on Flux, from the methods'
definitions (the bench and the tests put the measured counts beside these)."""
from __future__ import annotations


def _chunk(length: int, parts: int) -> int:
    return -(-length // parts)


def pipefusion_call_bytes(stage: int, stages: int, batch: int, text_len: int, width: int, bands: list[tuple[int, int]],
                          hidden: int, out_features: int, element_size: int = 4, sequence_degree: int = 1) -> dict[str, int]:
    """A stage sends each patch's [text, image] hidden rows once to the next stage (later patches carry one
    placeholder text row); the last stage broadcasts the model output. No keys/values cross stages."""
    if stage < stages - 1:
        rows = sum(_chunk(text_len if i == 0 else 1, sequence_degree) + _chunk((bottom - top) * width, sequence_degree)
                   for i, (top, bottom) in enumerate(bands))
        return {"send/pipefusion": batch * rows * hidden * element_size}
    image_len = (bands[-1][1] - bands[0][0]) * width
    return {"broadcast/pipefusion": batch * image_len * out_features * element_size * (stages - 1)}


def displaced_call_bytes(patches: int, batch: int, text_len: int, image_len: int, blocks: int, heads: int, head_dim: int,
                         out_features: int, synchronous: bool, element_size: int = 4) -> dict[str, int]:
    """Every block gathers the keys and values of every rank's rows, its band and the (replicated) text, in the
    background after warmup; the output rows are gathered once."""
    rows = text_len + _chunk(image_len, patches)
    kv = blocks * 2 * batch * rows * heads * head_dim * element_size * (patches - 1)
    output = batch * _chunk(image_len, patches) * out_features * element_size * (patches - 1)
    if synchronous:
        return {"all_gather/patch": kv + output}
    return {"all_gather/patch": output, "all_gather_async/patch": kv}
