"""Fixtures for tests, benches and the demo: seeded tiny models of real families (Flux, Flux.2, an SD1.5 U-Net),
LoRAs and a TAEF1 VAE, and a headless ComfyUI server launcher. Nothing here runs in a user's ComfyUI."""
