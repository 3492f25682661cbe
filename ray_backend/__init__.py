"""The worker pool: Ray actors (one per device) joined in one torch.distributed group, serving jobs."""
