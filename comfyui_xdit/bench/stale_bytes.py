"""Bytes one rank sends per model call for PipeFusion and displaced patch parallel on Flux, from the methods'
definitions (the bench and the tests put the measured counts beside these)."""
from __future__ import annotations


def _chunk(length: int, parts: int) -> int:
    return -(-length // parts)


def pipefusion_call_bytes(stage: int, stages: int, batch: int, text_len: int, width: int, bands: list[tuple[int, int]],
                          hidden: int, out_features: int, element_size: int = 4, sequence_degree: int = 1,
                          looks_ahead: bool = False) -> dict[str, int]:
    """A stage sends each patch's [text, image] hidden rows once to the next stage (later patches carry one
    placeholder text row); the last stage broadcasts the model output, and in a call that looks ahead
    (pipefusion_lookahead) first sends the first patch's output back to the first stage. No keys/values cross stages."""
    if stage < stages - 1:
        rows = sum(_chunk(text_len if i == 0 else 1, sequence_degree) + _chunk((bottom - top) * width, sequence_degree)
                   for i, (top, bottom) in enumerate(bands))
        return {"send/pipefusion": batch * rows * hidden * element_size}
    image_len = (bands[-1][1] - bands[0][0]) * width
    sent = {"broadcast/pipefusion": batch * image_len * out_features * element_size * (stages - 1)}
    if looks_ahead:
        sent["send/pipefusion"] = batch * (bands[0][1] - bands[0][0]) * width * out_features * element_size
    return sent


def looks_ahead(call: int, steps: int, warmup_steps: int = 1) -> bool:
    """Whether PipeFusion's call `call` of a plain Euler run of `steps` steps runs the next call's first patch ahead:
    after the warmup, when the next call exists and is not a warmup call."""
    return warmup_steps <= call <= steps - 2


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
