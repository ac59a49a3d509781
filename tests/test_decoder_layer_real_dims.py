"""One decoder layer at Qwen1.5-32B's real dimensions matches HF's Qwen2DecoderLayer."""

from __future__ import annotations

import pytest
import torch

from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.model import AttentionMetadata, DecoderLayer, ModelConfig, RotaryEmbedding

REAL = dict(
    hidden_size=5120,
    intermediate_size=27392,
    num_hidden_layers=1,
    num_attention_heads=40,
    num_key_value_heads=8,
    vocab_size=16,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
)


@pytest.mark.slow
def test_real_dimension_layer_matches_hf():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    hf_config = Qwen2Config(**REAL, attn_implementation="eager")
    torch.manual_seed(0)
    config = ModelConfig(**REAL)
    with torch.device("meta"):  # no initialisation: every parameter is assigned below
        hf_layer = Qwen2DecoderLayer(hf_config, layer_idx=0).eval()
        ours = DecoderLayer(config)
    values = {
        name: 1 + 0.1 * torch.randn(p.shape) if "layernorm" in name else torch.randn(p.shape).mul_(0.02)
        for name, p in hf_layer.named_parameters()
    }
    hf_layer.load_state_dict(values, strict=True, assign=True)
    ours.load_state_dict(hf_layer.state_dict(), strict=True, assign=True)  # shares the tensors: no second copy

    num_tokens = 8
    x = torch.randn(1, num_tokens, config.hidden_size)
    positions = torch.arange(100, 100 + num_tokens)  # not at 0: RoPE at real offsets
    with torch.no_grad():
        cos, sin = Qwen2RotaryEmbedding(hf_config)(x, positions[None])
        mask = torch.full((num_tokens, num_tokens), float("-inf")).triu(1)[None, None]
        ref = hf_layer(x, attention_mask=mask, position_ids=positions[None], position_embeddings=(cos, sin))[0]

        # Ours: the first 100 positions' K/V are absent, so run the 8 tokens as a fresh sequence whose
        # positions start at 100 but whose attention sees only these 8 keys (the same as HF above).
        cache = KVCache(1, num_blocks=1, block_size=num_tokens, num_kv_heads=8, head_dim=128)
        meta = AttentionMetadata.build([(0, num_tokens, [0])], num_tokens, torch.device("cpu"))
        meta.positions = positions
        cos_sin = RotaryEmbedding(config.head_dim, config.rope_theta)(positions, torch.float32)
        k, v = cache.layer(0)
        got = ours(x[0], cos_sin, meta, k, v)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    print(f"real-dimension layer: relative error {rel:.3g}")
    assert rel <= 1e-4
