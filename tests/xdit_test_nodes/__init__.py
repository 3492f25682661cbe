"""TEST-ONLY ComfyUI node pack for comfyui-xdit's server tests: never ship it in a user's custom_nodes/.

The test server links this folder into its custom_nodes/ beside the repository itself.
"""

from __future__ import annotations

import torch

SEED_MAX = 0xFFFFFFFFFFFFFFFF


class XDiTTestConditioning:
    """Seeded random CONDITIONING shaped like Flux's text encoders' output (T5 context + CLIP-L pooled vector).

    It stands in for DualCLIPLoader + CLIPTextEncode in tests because no text-encoder weights exist on the test
    machines; stock FluxGuidance can add guidance to it as to any CONDITIONING. The defaults match the tiny Flux
    (context_in_dim 64, vec_in_dim 32).
    """

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX}),
                "text_tokens": ("INT", {"default": 7, "min": 1, "max": 4096}),
                "context_dim": ("INT", {"default": 64, "min": 1, "max": 16384}),
                "pooled_dim": ("INT", {"default": 32, "min": 1, "max": 16384}),
            },
            # T5 encoders of some families (LTX-Video) also hand the model their text mask; all ones here.
            "optional": {"text_mask": ("BOOLEAN", {"default": False})},
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing/xdit"

    def encode(self, seed: int, text_tokens: int, context_dim: int, pooled_dim: int, text_mask: bool = False) -> tuple[list]:
        generator = torch.Generator().manual_seed(seed)
        context = torch.randn((1, text_tokens, context_dim), generator=generator)
        pooled = torch.randn((1, pooled_dim), generator=generator)
        extra = {"attention_mask": torch.ones((1, text_tokens), dtype=torch.long)} if text_mask else {}
        return ([[context, {"pooled_output": pooled, **extra}]],)


class XDiTTestClipVisionOutput:
    """Seeded random CLIP_VISION_OUTPUT shaped like CLIPVisionEncode's for Wan 2.1 I2V (ViT-H/14's penultimate hidden
    states: 257 tokens of 1280).

    It stands in for CLIPVisionLoader + CLIPVisionEncode in tests: ComfyUI builds a CLIP vision model from fixed
    configs at its real size (ViT-H: ~630 M parameters), so none can be made tiny, and no weights exist on the test
    machines. The object is ComfyUI's own comfy.clip_vision.Output, holding only what Wan's img_emb reads.
    """

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX}),
                "tokens": ("INT", {"default": 257, "min": 1, "max": 4096}),
                "width": ("INT", {"default": 1280, "min": 1, "max": 16384}),
            },
        }

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "testing/xdit"

    def encode(self, seed: int, tokens: int, width: int) -> tuple:
        import comfy.clip_vision

        output = comfy.clip_vision.Output()
        output["penultimate_hidden_states"] = torch.randn((1, tokens, width), generator=torch.Generator().manual_seed(seed))
        return (output,)


class XDiTTestOneDNN:
    """Turns oneDNN on or off in the server process, for the prompts that follow (a graph of this node alone).

    oneDNN picks its convolution kernel by batch size, so a U-Net whose batch CFG or data parallel splits differs from
    stock by kernel choice alone (up to 2.6e-6 of the latent's max on an AVX2 CPU). With PyTorch's own convolution,
    which treats every sample alike, on both sides a test sees only what the parallel methods change; the pool
    computes with the server's switch because every job carries the server's torch switches to the workers.
    """

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"enabled": ("BOOLEAN", {"default": True})}}

    @classmethod
    def IS_CHANGED(cls, enabled: bool) -> float:
        return float("nan")  # run every time it is queued: the switch is process state, not a cached output

    RETURN_TYPES = ()
    FUNCTION = "switch"
    OUTPUT_NODE = True
    CATEGORY = "testing/xdit"

    def switch(self, enabled: bool) -> tuple:
        torch.backends.mkldnn.enabled = enabled
        return ()


NODE_CLASS_MAPPINGS = {"XDiTTestConditioning": XDiTTestConditioning, "XDiTTestClipVisionOutput": XDiTTestClipVisionOutput,
                       "XDiTTestOneDNN": XDiTTestOneDNN}
NODE_DISPLAY_NAME_MAPPINGS = {"XDiTTestConditioning": "xDiT Test Conditioning (random, tests only)",
                              "XDiTTestClipVisionOutput": "xDiT Test CLIP Vision Output (random, tests only)",
                              "XDiTTestOneDNN": "xDiT Test oneDNN switch (tests only)"}
