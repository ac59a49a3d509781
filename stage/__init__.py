"""One pipeline stage: its decoder layers, weights, KV cache and sampler."""
