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


NODE_CLASS_MAPPINGS = {"XDiTTestConditioning": XDiTTestConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"XDiTTestConditioning": "xDiT Test Conditioning (random, tests only)"}
