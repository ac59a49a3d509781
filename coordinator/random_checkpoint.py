"""Writes a small random Qwen2 checkpoint folder (HF layout) with a freshly trained byte-level BPE tokenizer.

Used by `make demo` before a real model is fetched, and by the tests: the folder has everything a
real checkpoint has (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the
ChatML template, generation_config.json), so every code path runs on it.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A pipeline splits the layers of a model into stages.",
    "Each stage runs on its own node and sends activations to the next one over the network.",
    "You are a helpful assistant. What is the capital of France? Paris is the capital of France.",
    "Give me a short introduction to large language models. They predict the next token of text.",
    "Café, naïve, résumé, jalapeño, Zürich, São Paulo, Kraków, Ærøskøbing.",
    "大型语言模型是一种人工智能。你好，世界！日本語のテキストも少し。한국어 문장도 있습니다.",
    "Emoji: 🚂🚃🚃 🙂 👍🏽 — and symbols: ∑ ∞ ≠ → ½ €100.",
    "def forward(self, x):\n    return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2026-11-29",
]


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer like Qwen2's (NFC, byte-level pre-tokenizer and decoder, ChatML specials)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


def write_tokenizer_files(model_dir: str | Path, vocab_size: int = 400) -> dict[str, int]:
    """tokenizer.json + tokenizer_config.json (ChatML) in model_dir; returns the special tokens' ids."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(model_dir / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "added_tokens_decoder": added,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "chat_template": CHATML_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "model_max_length": 32768,
            },
            indent=2,
        )
    )
    return ids


def _random_tensors(
    h: int, i: int, v: int, num_layers: int, num_heads: int, num_kv_heads: int, tied: bool, seed: int, std: float
) -> dict:
    """Every tensor of a Qwen2ForCausalLM under its HF name; norms near 1, the rest around 0."""
    import torch

    g = torch.Generator().manual_seed(seed)
    head_dim = h // num_heads
    q, kv = num_heads * head_dim, num_kv_heads * head_dim

    def rand(*shape):
        return torch.randn(shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": 1 + rand(h)}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        tensors |= {
            p + "self_attn.q_proj.weight": rand(q, h),
            p + "self_attn.q_proj.bias": rand(q),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.k_proj.bias": rand(kv),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.bias": rand(kv),
            p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h),
            p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i),
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
        }
    if not tied:
        tensors["lm_head.weight"] = rand(v, h)
    return tensors


def write_random_checkpoint(
    model_dir: str | Path,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1e6,
    seed: int = 0,
    std: float = 0.1,
) -> Path:
    """A random float32 Qwen2 checkpoint in HF layout; std sets the weights' scale (larger: sharper logits)."""
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    special = write_tokenizer_files(model_dir, vocab_size=min(400, vocab_size))
    tensors = _random_tensors(
        hidden_size,
        intermediate_size,
        vocab_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        tie_word_embeddings,
        seed,
        std,
    )
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_word_embeddings,
        "use_sliding_window": False,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "torch_dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "generation_config.json").write_text(json.dumps(_generation_config(special), indent=2))
    return model_dir


def _generation_config(special: dict[str, int]) -> dict:
    """Qwen1.5-Chat's sampling defaults, with this tokenizer's stop and pad ids."""
    return {
        "do_sample": True,
        "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
        "pad_token_id": special["<|endoftext|>"],
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.05,
    }
