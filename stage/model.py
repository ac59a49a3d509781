"""The Qwen2 decoder split into stages: one stage owns a contiguous range of layers over a paged KV cache.

Read top to bottom (the config is `proto/model_config.py`): RMSNorm → rotary embedding → MLP → attention → decoder layer →
stage model. Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, …),
so a checkpoint's tensors load without renaming. The maths follows HF `modeling_qwen2.py`
(RMSNorm in float32, rotate-half RoPE, q/k/v biases, SwiGLU), so outputs equal HF's.

A forward pass takes one flat batch of tokens from many sequences at once (prefill chunks and
decode tokens mixed). Each sequence brings its own positions; K/V are written into the cache at
the slots the caller chose and read back through the sequence's block table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from stagecoach.errors import ConfigError
from stagecoach.proto.model_config import ModelConfig
from stagecoach.stage import paged_attention
from stagecoach.stage.kv_cache import KVCache
from stagecoach.stage.paged_attention import decode_attention, decode_mask, prefill_attention


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Computed in float32 and cast back before the weight, exactly as HF does.
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half (NeoX) RoPE; cos/sin are computed in float32 for arbitrary per-token positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.float()  # [num_tokens, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, head_dim] broadcast over heads.
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# oneDNN's prepacked float32 matrix products, measured on the 2-core AMD machine (bench/compiled.py): 1.6-1.8x faster
# than the default (MKL) at one token and 2.4-2.9x at 16 over a stage's weights; packing for 64 rows was the best layout
# for every batch size tried (1-64).
PACK_ROWS = 64


class Linear(nn.Linear):
    """nn.Linear whose weight a float32 CPU stage can swap for oneDNN's prepacked copy (`pack`), once, after loading."""

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        # The dense weight is dropped: the stage holds one copy of its weights.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        if torch.compiler.is_compiling():  # one opaque operator, see packed_linear
            return torch.ops.stagecoach.packed_linear(x, self.packed, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


@torch.library.custom_op("stagecoach::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Linear.forward's product in a compiled step. Opaque, so that inductor leaves it as it is: it would fold the
    neighbouring SiLU and residual adds into oneDNN post-ops, measured 20-40% slower per product at one token."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Linear.pack` applies: float32 on a CPU with oneDNN (other dtypes keep torch's default products)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        # GPTQ's act-order: the order gate_proj and up_proj both read their input in, applied once (stage/gptq_awq.py).
        self.register_buffer("input_perm", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x[..., self.input_perm]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class AttentionMetadata:
    """Where each sequence's tokens sit in the flat batch and in the paged cache; shared by all layers.

    Decode tokens (one query each) are attended in one call; prefill chunks one by one, each over its cached prefix.
    """

    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) per token
    # Decode group: sequences with exactly one query token.
    decode_token_index: torch.Tensor | None = None  # [num_decode] rows of the flat batch
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] padded with block 0
    decode_context_lens: torch.Tensor | None = None  # [num_decode] int64: keys each decode token attends to
    # Only where no kernel reads the cache in place (the gather path): [num_decode, 1, 1, max_blocks * block_size], True = attend.
    decode_mask: torch.Tensor | None = None
    # Prefill chunks: (first row, num_tokens, block ids [n_blocks] covering the chunk, first position).
    prefills: list[tuple[int, int, torch.Tensor, int]] = field(default_factory=list)

    @classmethod
    def build(cls, seqs: list[tuple[int, int, list[int]]], block_size: int, device: torch.device) -> AttentionMetadata:
        """seqs: per sequence, in batch order, (first position, num_tokens, block table)."""
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills = []
        row = 0
        for start, num_tokens, block_table in seqs:
            context_len = start + num_tokens
            positions.extend(range(start, context_len))
            slots.extend(block_table[p // block_size] * block_size + p % block_size for p in range(start, context_len))
            num_blocks = -(-context_len // block_size)
            if num_tokens == 1:
                decode_rows.append(row)
                decode_tables.append(block_table[:num_blocks])
                decode_lens.append(context_len)
            else:
                prefills.append(
                    (row, num_tokens, torch.tensor(block_table[:num_blocks], dtype=torch.long, device=device), start)
                )
            row += num_tokens
        meta = cls(
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            prefills=prefills,
        )
        if decode_rows:
            max_blocks = max(len(t) for t in decode_tables)
            padded = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
            meta.decode_token_index = torch.tensor(decode_rows, dtype=torch.long, device=device)
            meta.decode_block_tables = torch.tensor(padded, dtype=torch.long, device=device)
            meta.decode_context_lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
            if not paged_attention.prepare(torch.device(device)):  # built once per step, not once per layer
                meta.decode_mask = decode_mask(meta.decode_context_lens, max_blocks * block_size)
        return meta

    @classmethod
    def padded_decode(
        cls, seqs: list[tuple[int, list[int]]], block_size: int, device: torch.device, rows: int, pad_block: int
    ) -> AttentionMetadata:
        """A decode batch (one token per sequence; per sequence its position and block table) padded to `rows` sequences and
        a block-table width of a power of two: the shapes a compiled decode step is built for. A padding row attends to
        one key of `pad_block`, where it also writes; its output is dropped."""
        max_blocks = max(position // block_size + 1 for position, _ in seqs)
        width = max(2, 1 << (max_blocks - 1).bit_length())  # at least 2: a dimension of 1 would be specialised
        positions, slots, tables = [], [], []
        for position, block_table in seqs:
            positions.append(position)
            slots.append(block_table[position // block_size] * block_size + position % block_size)
            used = block_table[: position // block_size + 1]
            tables.append(used + [pad_block] * (width - len(used)))
        pad = rows - len(seqs)
        lens = [p + 1 for p in positions] + [1] * pad
        return cls(
            positions=torch.tensor(positions + [0] * pad, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slots + [pad_block * block_size] * pad, dtype=torch.long, device=device),
            decode_block_tables=torch.tensor(tables + [[pad_block] * width] * pad, dtype=torch.long, device=device),
            decode_context_lens=torch.tensor(lens, dtype=torch.long, device=device),
        )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.register_buffer("input_perm", None)  # act-order: the order q, k and v all read their input in

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        if self.input_perm is not None:
            hidden_states = hidden_states[:, self.input_perm]
        q = self.q_proj(hidden_states).view(num_tokens, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        k = self.k_proj(hidden_states).view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = self.v_proj(hidden_states).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)

        # k_cache: [num_blocks, block_size, kv_heads, head_dim]; a slot indexes the flattened first two dims.
        k_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, self.num_kv_heads, self.head_dim)[meta.slot_mapping] = v.to(v_cache.dtype)

        if not meta.prefills and meta.decode_block_tables is not None:
            # Every row is a decode token (always so in the compiled decode step): no gather, no scatter.
            out = decode_attention(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scaling, meta.decode_mask
            )
            return self.o_proj(out.view(num_tokens, self.num_heads * self.head_dim))
        out = torch.empty_like(q)
        if meta.decode_token_index is not None:
            q_d = q[meta.decode_token_index]  # [B, heads, head_dim]
            out[meta.decode_token_index] = decode_attention(
                q_d,
                k_cache,
                v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                self.scaling,
                meta.decode_mask,
            )
        for row, n, blocks, start in meta.prefills:  # each query sees its cached prefix and the chunk up to itself
            out[row : row + n] = prefill_attention(q[row : row + n], k_cache, v_cache, blocks, start, self.scaling)
        return self.o_proj(out.view(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos_sin, meta, k_cache, v_cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class Qwen2StageBody(nn.Module):
    """HF's `model.` prefix: embed_tokens (first stage), the owned layers, norm (last stage)."""

    def __init__(self, config: ModelConfig, layer_start: int, layer_end: int, is_first: bool, is_last: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if is_first else None
        # Keys are the global layer numbers, so parameter names equal the checkpoint's.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config) for i in range(layer_start, layer_end)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if is_last else None


class StageModel(nn.Module):
    """Layers [layer_start, layer_end) of a Qwen2ForCausalLM, plus the ends it owns.

    The first stage takes token ids, any other the previous stage's hidden states
    [num_tokens, hidden]; the last stage returns logits for the requested rows only.
    """

    def __init__(self, config: ModelConfig, layer_start: int, layer_end: int) -> None:
        super().__init__()
        if not 0 <= layer_start < layer_end <= config.num_hidden_layers:
            raise ConfigError(
                f"layer range [{layer_start}, {layer_end}) is not inside the model's {config.num_hidden_layers} layers"
            )
        self.config = config
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first = layer_start == 0
        self.is_last = layer_end == config.num_hidden_layers
        self.model = Qwen2StageBody(config, layer_start, layer_end, self.is_first, self.is_last)
        # With tied embeddings the last stage still owns an lm_head: the loader fills it from
        # model.embed_tokens.weight (sharing the tensor when the stage is also the first).
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False) if self.is_last else None
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def pack(self) -> None:
        """Prepacks every matrix product's weight for oneDNN (see `can_pack`); once, after loading."""
        for module in self.modules():
            if isinstance(module, Linear) and module.packed is None:
                module.pack()

    def forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache, logits_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """inputs: token ids [num_tokens] (first stage) or hidden states [num_tokens, hidden].

        Returns hidden states [num_tokens, hidden], or on the last stage the logits
        [len(logits_rows), vocab] (all rows when logits_rows is None).
        """
        return self.head(self.decoder_layers(self.embed(inputs), meta, kv_cache), logits_rows)

    # The three parts of forward, which the runner times apart (the layers' share is what rebalancing moves).
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(inputs) if self.is_first else inputs

    def decoder_layers(self, hidden_states: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        cos_sin = self.rotary_emb(meta.positions, hidden_states.dtype)
        for local_index, layer in enumerate(self.model.layers.values()):
            k_cache, v_cache = kv_cache.layer(local_index)
            hidden_states = layer(hidden_states, cos_sin, meta, k_cache, v_cache)
        return hidden_states

    def head(self, hidden_states: torch.Tensor, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's final norm and lm_head (for logits_rows only, when given); other stages pass through."""
        if not self.is_last:
            return hidden_states
        if logits_rows is not None:
            hidden_states = hidden_states[logits_rows]
        return self.lm_head(self.model.norm(hidden_states))
