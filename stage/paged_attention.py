"""Attention over the paged KV cache: in place by a C++/OpenMP kernel on CPU (built on first use), else gathered.

Gathering every sequence's K and V out of the block pool on every layer reads the context twice and
writes it once, padded to the longest sequence. The kernel walks each sequence's block table instead
and reads each key and value once for all the query heads that share it (grouped-query attention):
`paged_decode` for one query per sequence, `paged_prefill` for a prefill chunk over its cached prefix.
Where it cannot be built (no compiler) or on other devices, both return None and the caller keeps
the gather path; the reason is logged once.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from stagecoach.stage import cpu_build

log = logging.getLogger(__name__)


@functools.cache
def cpu_kernel():
    """The compiled kernel, or None (logged once) where it cannot be built here."""
    return cpu_build.build(log, "paged attention", "attention gathers the cache instead")


def prepare(device: torch.device) -> bool:
    """Builds (or loads the cached build of) the kernel for this device now; whether there is one."""
    return device.type == "cpu" and cpu_kernel() is not None


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor | None:
    """Attention of one query token per sequence over its cached context, read in place.

    q: [B, heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim];
    block_tables: [B, max_blocks] int64; context_lens: [B] int64. Returns [B, heads, head_dim] in
    q's dtype, or None where there is no kernel for this device (the caller gathers instead).
    """
    if q.device.type != "cpu":
        return None
    kernel = cpu_kernel()
    if kernel is None:
        return None
    return kernel.paged_decode(q.float(), k_cache, v_cache, block_tables, context_lens, scale).to(q.dtype)


def paged_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, start: int, scale: float
) -> torch.Tensor | None:
    """Causal attention of a prefill chunk's queries (positions start .. start + n - 1) over its cached prefix and itself.

    q: [n, heads, head_dim]; blocks: [n_blocks] int64, the sequence's block table covering start + n positions (the
    chunk's own K/V already written). Returns [n, heads, head_dim] in q's dtype, or None where there is no kernel.
    """
    if q.device.type != "cpu":
        return None
    kernel = cpu_kernel()
    if kernel is None:
        return None
    return kernel.paged_prefill(q.float(), k_cache, v_cache, blocks, start, scale).to(q.dtype)


def gathered_prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """The same by copying the sequence's blocks out of the pool and SDPA with the causal mask offset by the prefix."""
    n, _, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    context = start + n
    k = k_cache[blocks].view(-1, kv_heads, head_dim)[:context]  # [context, kv_heads, head_dim]
    v = v_cache[blocks].view(-1, kv_heads, head_dim)[:context]
    mask = torch.arange(context, device=q.device)[None, :] <= torch.arange(start, context, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1).to(q.dtype),
        v.transpose(0, 1).to(q.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )  # [heads, n, head_dim]
    return out.transpose(0, 1)


def prefill_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """A prefill chunk over its cached prefix: in place where a kernel runs here, else gathered."""
    out = paged_prefill(q, k_cache, v_cache, blocks, start, scale)
    return out if out is not None else gathered_prefill(q, k_cache, v_cache, blocks, start, scale)


def decode_mask(context_lens: torch.Tensor, context: int) -> torch.Tensor:
    """The gather path's mask: [B, 1, 1, context] bool, True where a key is within the sequence's length."""
    return (torch.arange(context, device=context_lens.device)[None, :] < context_lens[:, None])[:, None, None, :]


def gathered_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same attention by copying each sequence's blocks out of the pool (padded to the longest) and SDPA.

    mask: decode_mask(context_lens, max_blocks * block_size), when the caller has it already."""
    num_decode, max_blocks = block_tables.shape
    _, block_size, kv_heads, head_dim = k_cache.shape
    context = max_blocks * block_size
    k = k_cache[block_tables].view(num_decode, context, kv_heads, head_dim)
    v = v_cache[block_tables].view(num_decode, context, kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, heads, 1, head_dim]
        k.transpose(1, 2).to(q.dtype),  # [B, kv_heads, context, head_dim]
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask if mask is not None else decode_mask(context_lens, context),
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(2)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its cached context: in place where a kernel runs here, else gathered (with mask).

    Under torch.compile it is one opaque operator (`stagecoach::decode_attention`), so that the compiled decode step has
    no graph break at the kernel; the mask is then rebuilt inside it where the gather path needs one.
    """
    if torch.compiler.is_compiling():
        return torch.ops.stagecoach.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    out = paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale)
    return out if out is not None else gathered_decode(q, k_cache, v_cache, block_tables, context_lens, scale, mask)


@torch.library.custom_op("stagecoach::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


@_decode_attention_op.register_fake
def _(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return torch.empty_like(q)
