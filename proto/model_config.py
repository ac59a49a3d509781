"""The model facts every process agrees on, read from a Hugging Face Qwen2 `config.json`; plain Python, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stagecoach.errors import ConfigError
from stagecoach.proto import gguf


@dataclass(slots=True)
class ModelConfig:
    """The fields of a Hugging Face `Qwen2Config` that the stage model needs."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"  # the checkpoint's own dtype

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim in config.json"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        """Maps an HF `config.json` (transformers 4.x or 5.x layout) onto this dataclass."""
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ConfigError(f"config.json: model_type is {model_type!r}; Stagecoach runs 'qwen2' models")
        if hf.get("use_sliding_window"):
            raise ConfigError("config.json: use_sliding_window is true; sliding-window attention is not supported")
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", (hf.get("rope_scaling") or {}).get("type", "default"))
        if rope_type not in ("default", None):
            raise ConfigError(f"config.json: rope type {rope_type!r} is not supported (only the default RoPE)")
        missing = [
            k
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in hf
        ]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        return cls(
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            head_dim=hf.get("head_dim") or 0,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """From a checkpoint folder's config.json, or from a GGUF file's metadata (the file, or a folder holding one)."""
        if (found := gguf.find_gguf(model_dir)) is not None:
            return cls.from_hf_dict(gguf.hf_config(gguf.read_gguf(found)))
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: --model must name a Hugging Face checkpoint folder or a GGUF file")
        return cls.from_hf_dict(json.loads(path.read_text()))

    def layer_num_params(self) -> int:
        """Parameters of one decoder layer (weights and biases)."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        )
        attention = h * q + q + 2 * (h * kv + kv) + q * h
        return attention + 3 * h * i + 2 * h
