"""The pack's ComfyUI nodes (classic node API: stable across ComfyUI releases, which V3's `latest` is not yet)."""
from comfyui_xdit.pool_client import install_exit_hooks, start_pool_with_comfyui
from comfyui_xdit.queued_start import register_queued_start

from .ksampler import XDiTKSampler, XDiTKSamplerAdvanced
from .lora_loader import XDiTFluxLoraLoader, XDiTLoraLoader
from .redundancy import XDiTCacheSchedule, XDiTRedundancyAnalysis
from .sampler import XDiTSamplerCustomAdvanced
from .status_route import register_status_route
from .unet_loader import XDiTUNetLoader
from .vae import XDiTVAEDecode, XDiTVAEEncode, XDiTVAELoader

NODE_CLASS_MAPPINGS = {
    "XDiTUNetLoader": XDiTUNetLoader,
    "XDiTSamplerCustomAdvanced": XDiTSamplerCustomAdvanced,
    "XDiTLoraLoader": XDiTLoraLoader,
    "XDiTFluxLoraLoader": XDiTFluxLoraLoader,
    "XDiTKSampler": XDiTKSampler,
    "XDiTKSamplerAdvanced": XDiTKSamplerAdvanced,
    "XDiTVAELoader": XDiTVAELoader,
    "XDiTVAEDecode": XDiTVAEDecode,
    "XDiTVAEEncode": XDiTVAEEncode,
    "XDiTRedundancyAnalysis": XDiTRedundancyAnalysis,
    "XDiTCacheSchedule": XDiTCacheSchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTUNetLoader": "Load Diffusion Model (XDiT pool)",
    "XDiTSamplerCustomAdvanced": "SamplerCustomAdvanced (XDiT pool)",
    "XDiTLoraLoader": "LoraLoaderModelOnly (XDiT pool)",
    "XDiTFluxLoraLoader": "LoraLoaderModelOnly (XDiT pool, old name)",
    "XDiTKSampler": "KSampler (XDiT pool)",
    "XDiTKSamplerAdvanced": "KSampler (Advanced) (XDiT pool)",
    "XDiTVAELoader": "Load VAE (XDiT pool)",
    "XDiTVAEDecode": "VAE Decode (XDiT pool)",
    "XDiTVAEEncode": "VAE Encode (XDiT pool)",
    "XDiTRedundancyAnalysis": "Redundancy Analysis (XDiT pool)",
    "XDiTCacheSchedule": "Cache Schedule from Analysis (XDiT pool)",
}

register_status_route()
register_queued_start(XDiTUNetLoader)
install_exit_hooks()
start_pool_with_comfyui()
