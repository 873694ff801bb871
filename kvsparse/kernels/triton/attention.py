"""Sparse decode attention in Triton: over per-head index lists, or over page lists of a paged cache.

Flash-Decoding style: the selected tokens of each row are cut into ``num_splits`` contiguous
chunks; one program per (row, split) runs an online softmax over its chunk and writes a partial
output and its log-sum-exp; a second kernel merges the splits by log-sum-exp (an empty split has
lse = -inf and weight 0). Inputs fp16 / bf16 / fp32; all accumulation in fp32.

Memory layout (contiguous in the last dim):
  q        [H_q, D]
  k, v     [H_kv, N, D]                      (contiguous form: one sequence)
  k, v     [num_pages, P, H_kv, D]           (paged form: vLLM-style pool of physical pages)
  entries  [R, W] int32, row r valid up to lengths[r]. An entry names E consecutive tokens
           (tokens e*E .. e*E+E-1, those < seq_len): E = 1 for token lists, E = P for page lists.
           R = H_kv (one list per KV head, shared by its G query heads: each KV row is loaded ONCE
           per group) or R = H_q (one list per query head).
  heads    [H_kv, W] int32, optional with R = H_kv: bit g set = query head kvh*G+g attends this entry.
           The list is then the UNION of the group's selections and each row is still read once.
  weights  [R, W] fp32, optional: multiplies exp(logit) of the entry's tokens (Horvitz-Thompson factors).
  block_table [num_logical_pages] int32 (paged form): logical page -> physical page.
Outputs: out [H_q, D] (dtype of q), lse [H_q] fp32 (natural log; -inf for an empty selection).

Scores of a group (R = H_kv, G > 1) are one tl.dot of the group's queries padded to 16 rows
(tensor cores, and no [G, BLOCK, D] product held in registers); a single query head uses a
broadcast product. Either way the products are exact in fp32 and the sums are fp32; the
probabilities are rounded to the input dtype before P @ V in the dot path, as FlashAttention does
(and as the naive reference of ``property_tests.tolerances`` does). The interpreter cannot multiply
bfloat16 matrices, so there (and for fp32 inputs) both dots run in fp32 "ieee" on the same rounded
operands: the products are exact either way, only the summation order can differ. fp16 runs the
GPU's fp16 dot in the interpreter as well.

The launch reads nothing back from the GPU when ``check_inputs=False`` (lengths are clamped in the
kernel instead), so a decode step can be captured in a CUDA graph; the default checks every input
on the host and raises a named error instead of reading out of bounds.

The split count is a runtime argument (only its power-of-two bound is compiled into the merge), so
the varying split counts of different shapes do not each compile a kernel.

torch and triton are imported lazily so the registry loads without the optional extra. Set
TRITON_INTERPRET=1 to run on a CPU (correct but slow).
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np

from ...registry import register_kernel

DOT_ROWS = 16
"""tl.dot needs at least 16 rows: a group's G queries are padded to this many."""


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(q_ptr, k_ptr, v_ptr, ent_ptr, len_ptr, w_ptr, heads_ptr, table_ptr, part_out_ptr, part_lse_ptr,
                     scale, seq_len, width, chunk,
                     stride_kh, stride_kn, stride_vh, stride_vn, stride_kp, stride_vp, stride_er,
                     G: tl.constexpr, ROW_IS_KV: tl.constexpr, GP: tl.constexpr, USE_DOT: tl.constexpr,
                     F32_DOT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                     ENTRY: tl.constexpr, HAS_W: tl.constexpr, HAS_HEADS: tl.constexpr,
                     PAGED: tl.constexpr, PAGE: tl.constexpr, NUM_SPLITS):
        row = tl.program_id(0)
        split = tl.program_id(1)
        kvh = row if ROW_IS_KV else row // G
        # query heads served by this row: the whole group (ROW_IS_KV) or just one head
        g_offs = tl.arange(0, GP)
        n_q = G if ROW_IS_KV else 1
        q_heads = (row * G + g_offs) if ROW_IS_KV else (row + g_offs * 0)
        g_mask = g_offs < n_q
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        q = tl.load(q_ptr + q_heads[:, None] * D + d_offs[None, :], mask=g_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if not USE_DOT:
            q = q.to(tl.float32)
        # lengths are clamped here so that an unchecked launch never reads outside the lists
        length = tl.minimum(tl.maximum(tl.load(len_ptr + row), 0), width) * ENTRY
        start = split * chunk
        stop = tl.minimum(start + chunk, length)
        m = tl.full([GP], -1.0e30, tl.float32)
        l = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for base in range(start, stop, BLOCK):
            b_offs = base + tl.arange(0, BLOCK)          # slot in the row's flattened token list
            b_mask = b_offs < stop
            e_offs = b_offs // ENTRY
            entry = tl.load(ent_ptr + row * stride_er + e_offs, mask=b_mask, other=0)
            tok = entry * ENTRY + b_offs % ENTRY          # logical token position
            b_mask = b_mask & (tok < seq_len)
            tok = tok.to(tl.int64)                        # offsets past 2^31 elements in a long cache
            if PAGED:
                phys = tl.load(table_ptr + tok // PAGE, mask=b_mask, other=0)
                k_off = phys * stride_kp + (tok % PAGE) * stride_kn + kvh * stride_kh
                v_off = phys * stride_vp + (tok % PAGE) * stride_vn + kvh * stride_vh
            else:
                k_off = kvh * stride_kh + tok * stride_kn
                v_off = kvh * stride_vh + tok * stride_vn
            kv_mask = b_mask[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + k_off[:, None] + d_offs[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + v_off[:, None] + d_offs[None, :], mask=kv_mask, other=0.0)
            if USE_DOT:
                if F32_DOT:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale                               # [GP, BLOCK]
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
            if HAS_W:
                w = tl.load(w_ptr + row * stride_er + e_offs, mask=b_mask, other=1.0)
                s = s + tl.log(w)[None, :]
            live = b_mask[None, :] & g_mask[:, None]
            if HAS_HEADS:
                bits = tl.load(heads_ptr + row * stride_er + e_offs, mask=b_mask, other=0)
                live = live & (((bits[None, :] >> g_offs[:, None]) & 1) != 0)
            s = tl.where(live, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if USE_DOT:
                if F32_DOT:
                    pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        has = l > 0
        out = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        o_ptrs = part_out_ptr + (q_heads[:, None] * NUM_SPLITS + split) * D + d_offs[None, :]
        tl.store(o_ptrs, out, mask=g_mask[:, None] & d_mask[None, :])
        tl.store(part_lse_ptr + q_heads * NUM_SPLITS + split, lse, mask=g_mask)

    @triton.jit
    def merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr,
                     D: tl.constexpr, DP: tl.constexpr, NUM_SPLITS, SP: tl.constexpr):
        h = tl.program_id(0)
        s_offs = tl.arange(0, SP)
        s_mask = s_offs < NUM_SPLITS
        lses = tl.load(part_lse_ptr + h * NUM_SPLITS + s_offs, mask=s_mask, other=float("-inf"))
        m = tl.max(lses, axis=0)
        finite = m > float("-inf")
        m_safe = tl.where(finite, m, 0.0)
        w = tl.where(lses > float("-inf"), tl.exp(lses - m_safe), 0.0)
        total = tl.sum(w, axis=0)
        d_offs = tl.arange(0, DP)
        d_mask = d_offs < D
        parts = tl.load(part_out_ptr + (h * NUM_SPLITS + s_offs[:, None]) * D + d_offs[None, :],
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        out = tl.sum(w[:, None] * parts, axis=0) / tl.where(finite, total, 1.0)
        tl.store(out_ptr + h * D + d_offs, out.to(out_ptr.dtype.element_ty), mask=d_mask)
        tl.store(lse_ptr + h, tl.where(finite, m_safe + tl.log(tl.where(finite, total, 1.0)), float("-inf")))

    return split_kernel, merge_kernel


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _f32_dot(dtype) -> bool:
    """fp32 inputs take the "ieee" fp32 dot; so does bf16 in the interpreter, which cannot multiply
    bf16 matrices. fp16 runs the GPU's own fp16 dot in the interpreter too, so CI exercises that path."""
    import torch
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreted())


def _check(q, k, v, entries, lengths, weights, heads, paged: bool):
    import torch
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q must be [H_q, D], got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    h_q, d = q.shape
    if paged:
        if k.dim() != 4:
            raise ValueError(f"paged k must be [num_pages, P, H_kv, D], got shape {tuple(k.shape)}")
        h_kv = k.shape[2]
    else:
        if k.dim() != 3:
            raise ValueError(f"k must be [H_kv, N, D], got shape {tuple(k.shape)}")
        h_kv = k.shape[0]
    if k.shape[-1] != d:
        raise ValueError(f"k's head dim {k.shape[-1]} must equal q's {d}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"H_q={h_q} must be divisible by H_kv={h_kv}")
    if not isinstance(entries, torch.Tensor) or entries.dim() != 2 or entries.shape[0] not in (h_q, h_kv):
        raise ValueError(f"indices must be [H_q or H_kv, B], got shape {tuple(getattr(entries, 'shape', ()))} "
                         f"(H_q={h_q}, H_kv={h_kv})")
    if lengths is not None and (lengths.dim() != 1 or lengths.shape[0] != entries.shape[0]):
        raise ValueError(f"lengths must be [{entries.shape[0]}], got shape {tuple(lengths.shape)}")
    if weights is not None and weights.shape != entries.shape:
        raise ValueError(f"weights must have the shape of indices {tuple(entries.shape)}, got {tuple(weights.shape)}")
    if heads is not None:
        g = h_q // h_kv
        if entries.shape[0] != h_kv:
            raise ValueError(f"heads needs one list per KV head: indices must be [H_kv={h_kv}, B], "
                             f"got shape {tuple(entries.shape)}")
        if heads.shape != entries.shape:
            raise ValueError(f"heads must have the shape of indices {tuple(entries.shape)}, got {tuple(heads.shape)}")
        if g > 31:
            raise ValueError(f"heads holds one bit per query head of a group: G={g} must be <= 31")
    return h_q, h_kv, d


def _check_values(entries, lengths, weights, heads, limit: int, what: str, g: int):
    """Host-side checks of the list contents (one device sync); skipped with ``check_inputs=False``."""
    import torch
    width = entries.shape[1]
    if int(lengths.min()) < 0 or int(lengths.max()) > width:
        raise ValueError(f"lengths must lie in [0, {width}], got [{int(lengths.min())}, {int(lengths.max())}]")
    valid = torch.arange(width, device=entries.device)[None, :] < lengths[:, None].to(entries.device)
    e = entries.to(torch.int64)
    if bool(((e < 0) | (e >= limit))[valid].any()):
        raise ValueError(f"{what} must lie in [0, {limit}) where valid (entries before lengths[r])")
    ordered = torch.sort(torch.where(valid, e, -1 - torch.arange(width, device=e.device)[None, :]), dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(f"{what} must be unique within a row (a repeated entry would be counted twice)")
    if weights is not None and bool((weights.to(torch.float32) < 0).any()):
        raise ValueError("weights must be non-negative")
    if heads is not None and bool(((heads.to(torch.int64) >> g) != 0)[valid].any()):
        raise ValueError(f"heads may only set bits 0..{g - 1} (one per query head of the group)")


def default_splits(rows: int, tokens: int, device) -> int:
    """Splits per row: enough programs to fill the GPU about four times over (Flash-Decoding), but
    at least 128 tokens per split; on the interpreter (a CPU), few programs."""
    import torch
    if device.type == "cuda" and not _interpreted():
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(64, math.ceil(target / max(rows, 1)), math.ceil(tokens / 128)))
    return max(1, min(16, math.ceil(tokens / 256)))


def _launch(q, k, v, entries, lengths, weights, heads, scale, num_splits, block, paged, block_table, entry_tokens,
            seq_len, check_inputs):
    import torch
    split_kernel, merge_kernel = _kernels()
    h_q, h_kv, d = _check(q, k, v, entries, lengths, weights, heads, paged)
    rows, width = entries.shape
    row_is_kv = rows == h_kv   # when H_q == H_kv the two readings coincide (G = 1)
    g = h_q // h_kv
    dev = q.device
    ent = entries.to(device=dev, dtype=torch.int32).contiguous()
    lengths = (torch.full((rows,), width, dtype=torch.int32, device=dev) if lengths is None
               else lengths.to(device=dev, dtype=torch.int32).contiguous())
    w = None if weights is None else weights.to(device=dev, dtype=torch.float32).contiguous()
    bits = None if heads is None else heads.to(device=dev, dtype=torch.int32).contiguous()
    page = int(k.shape[1]) if paged else 1
    if check_inputs:
        cached = block_table.shape[0] * page if paged else k.shape[1]
        limit = -(-cached // entry_tokens)         # entries are tokens (E = 1) or pages (E = P)
        _check_values(ent, lengths, w, bits, limit, "pages" if entry_tokens > 1 else "indices", g)
        if paged and block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= k.shape[0]):
            raise ValueError(f"block_table entries must lie in [0, {k.shape[0]}) (physical pages)")
    tokens = width * entry_tokens
    num_splits = max(1, int(num_splits if num_splits is not None else default_splits(rows, tokens, dev)))
    chunk = max(1, math.ceil(tokens / num_splits))
    part_out = torch.empty((h_q, num_splits, d), dtype=torch.float32, device=dev)
    part_lse = torch.empty((h_q, num_splits), dtype=torch.float32, device=dev)
    k, v, q = k.contiguous(), v.contiguous(), q.contiguous()
    if paged:
        stride_kp, stride_kn, stride_kh = k.stride(0), k.stride(1), k.stride(2)
        stride_vp, stride_vn, stride_vh = v.stride(0), v.stride(1), v.stride(2)
        table = block_table.to(device=dev, dtype=torch.int32).contiguous()
    else:
        stride_kh, stride_kn, stride_vh, stride_vn = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
        stride_kp = stride_vp = 0
        table = ent  # unused
    use_dot = row_is_kv and g > 1 and d >= 16
    gp = max(DOT_ROWS, _next_pow2(g)) if use_dot else _next_pow2(g if row_is_kv else 1)
    split_kernel[(rows, num_splits)](
        q, k, v, ent, lengths, w if w is not None else part_lse, bits if bits is not None else ent, table,
        part_out, part_lse,
        float(scale if scale is not None else 1.0 / math.sqrt(d)), int(seq_len), width, chunk,
        stride_kh, stride_kn, stride_vh, stride_vn, stride_kp, stride_vp, ent.stride(0),
        G=g, ROW_IS_KV=row_is_kv, GP=gp, USE_DOT=use_dot, F32_DOT=_f32_dot(q.dtype),
        D=d, DP=max(16, _next_pow2(d)), BLOCK=max(16, _next_pow2(block)),
        ENTRY=entry_tokens, HAS_W=w is not None, HAS_HEADS=bits is not None,
        PAGED=paged, PAGE=page, NUM_SPLITS=num_splits)
    out = torch.empty((h_q, d), dtype=q.dtype, device=dev)
    lse = torch.empty((h_q,), dtype=torch.float32, device=dev)
    merge_kernel[(h_q,)](part_out, part_lse, out, lse, D=d, DP=max(16, _next_pow2(d)), NUM_SPLITS=num_splits,
                         SP=_next_pow2(num_splits))
    return out, lse


def decode_attention_indices(q, k, v, indices, lengths=None, weights=None, *, heads=None, scale=None,
                             num_splits=None, block: int = 32, check_inputs: bool = True):
    """Attention of each query head over its index list; returns ``(out [H_q, D], lse [H_q])``.

    ``indices`` is ``[H_kv, B]`` (shared by each group: every selected KV row loaded once per group)
    or ``[H_q, B]`` (per query head); entries past ``lengths[r]`` are ignored; entries must be unique.
    ``heads [H_kv, B]`` (bit g: query head g of the group attends the entry) turns a per-KV-head list
    into the union of per-query-head selections, still reading each row once.
    """
    n = k.shape[1] if getattr(k, "dim", lambda: 0)() == 3 else 0
    return _launch(q, k, v, indices, lengths, weights, heads, scale, num_splits, block, False, None, 1, n,
                   check_inputs)


def decode_attention_page_list(q, k, v, pages, page_counts=None, *, page_size: int, heads=None, scale=None,
                               num_splits=None, check_inputs: bool = True):
    """Attention over whole pages of a contiguous cache ``k, v [H_kv, N, D]`` (page p holds tokens
    ``p*P .. p*P+P-1``; the last page is cut at N): ``pages [R, B]`` page numbers, valid up to
    ``page_counts[r]``, ``heads`` as in :func:`decode_attention_indices`. No token list is built."""
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    n = k.shape[1] if getattr(k, "dim", lambda: 0)() == 3 else 0
    return _launch(q, k, v, pages, page_counts, None, heads, scale, num_splits, _next_pow2(max(32, page_size)), False, None,
                   page_size, n, check_inputs)


def decode_attention_pages(q, k_pages, v_pages, block_table, pages, page_counts, seq_len, *, heads=None, scale=None,
                           num_splits=None, check_inputs: bool = True):
    """Attention over whole pages of a paged cache.

    ``k_pages``/``v_pages`` ``[num_physical, P, H_kv, D]``; ``block_table [num_logical]`` maps the
    sequence's logical page to its physical page; ``pages [R, B]`` lists selected logical pages per
    row (R = H_kv or H_q), valid up to ``page_counts[r]``; ``seq_len`` tokens exist (the last page may
    be partial: its unfilled slots are never read). Everything stays on the device.
    """
    import torch
    if not isinstance(pages, torch.Tensor) or pages.dim() != 2:
        raise ValueError(f"pages must be [R, B], got shape {tuple(getattr(pages, 'shape', ()))}")
    if not isinstance(k_pages, torch.Tensor) or k_pages.dim() != 4:
        raise ValueError(f"paged k must be [num_pages, P, H_kv, D], got shape {tuple(getattr(k_pages, 'shape', ()))}")
    page = int(k_pages.shape[1])
    seq_len = int(seq_len)
    if seq_len < 0 or seq_len > block_table.shape[0] * page:
        raise ValueError(f"seq_len must lie in [0, {block_table.shape[0] * page}], got {seq_len}")
    return _launch(q, k_pages, v_pages, pages, page_counts, None, heads, scale, num_splits, _next_pow2(max(32, page)), True,
                   block_table, page, seq_len, check_inputs)


def dense_decode(q, k, v, *, scale=None, num_splits=None):
    """Dense decode attention (all N tokens of each KV head) through the split-K kernel (torch API)."""
    import torch
    if not isinstance(k, torch.Tensor) or k.dim() != 3:
        raise ValueError(f"k must be [H_kv, N, D], got shape {tuple(getattr(k, 'shape', ()))}")
    # the whole cache as pages of 64 tokens: a list of N/64 entries, nothing to check
    pages = torch.arange(-(-k.shape[1] // 64), dtype=torch.int32, device=q.device)[None, :].expand(k.shape[0], -1)
    return decode_attention_page_list(q, k, v, pages, page_size=64, scale=scale, num_splits=num_splits,
                                      check_inputs=False)


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_torch(x, name: str = "x"):
    """A NumPy array (float16 / bfloat16 / float32) or tensor as a torch tensor on the kernel's device."""
    import torch
    if isinstance(x, torch.Tensor):
        return x.to(device())
    import numpy as np
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16).astype(np.int16)).view(torch.bfloat16).to(device())
    if x.dtype.name not in ("float16", "float32"):
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    return torch.from_numpy(x).to(device())


def to_numpy(t):
    """A kernel output back to NumPy on the host (bfloat16 comes back as float32, exactly)."""
    import torch
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.detach().cpu().numpy()


@register_kernel("dense", "triton")
def dense(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract (property_tests/suites.py): ``(out [H_q, d], indices)`` as NumPy."""
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    out, _ = dense_decode(qt, kt, vt, scale=scale)
    n = kt.shape[1]
    return to_numpy(out), [np.arange(n) for _ in range(qt.shape[0])]


# --- helpers shared by the method kernels (selection on the device, masks to index lists) ---------

def topk_core(scores, k: int):
    """``[R, k]`` indices of the ``k`` largest scores per row under the core tie rule (higher score
    first, the lower index among equal scores): a stable descending sort, unlike ``torch.topk``."""
    import torch
    k = max(0, min(int(k), scores.shape[1]))
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def mask_to_indices(mask):
    """A ``[R, n]`` bool mask as ``(indices [R, B] int32 ascending, lengths [R])``, ``B`` the largest row."""
    import torch
    rows, n = mask.shape
    lengths = mask.sum(dim=1)
    width = max(1, int(lengths.max())) if rows else 1
    # positions of the set entries first (stable: ascending), then the padding
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return order.to(torch.int32).contiguous(), lengths


def indices_to_mask(indices, n: int):
    """``[R, k]`` indices as a ``[R, n]`` bool mask."""
    import torch
    mask = torch.zeros((indices.shape[0], n), dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices.to(torch.int64), True)


def attend_mask(q, k, v, mask, *, scale=None):
    """Attention of each query head over its row of ``mask [H_q or H_kv, n]``: ``(out, lse, rows)``;
    ``rows`` are the per-row sorted token ids as NumPy (the kernel-step contract's indices)."""
    idx, lengths = mask_to_indices(mask)
    out, lse = decode_attention_indices(q, k, v, idx, lengths, scale=scale)
    idx_np, len_np = idx.cpu().numpy(), lengths.cpu().numpy()
    return out, lse, [idx_np[r, : len_np[r]].astype(np.int64) for r in range(idx_np.shape[0])]


def rows_per_query_head(rows, h_q: int):
    """Per-KV-head lists repeated for each query head of the group (identity when ``len(rows) == h_q``)."""
    g = h_q // len(rows)
    return [rows[h // g] for h in range(h_q)]


def selection_mask(selection, h_kv: int, device):
    """An oracle ``Selection`` (a set per query head) as a ``[U, n]`` bool mask on the device: one row
    per KV head (U = H_kv: each selected row read once per group) when every head of each group has
    the same set, else one per query head."""
    import torch
    mask = selection.mask()
    g = mask.shape[0] // h_kv
    grouped = mask.reshape(h_kv, g, -1)
    if (grouped == grouped[:, :1]).all():
        mask = grouped[:, 0]
    return torch.from_numpy(np.ascontiguousarray(mask)).to(device)


def pattern_step(method, q, k, v, *, positions=None, scale=None):
    """Kernel-step contract of a positional pattern (sliding window, BigBird, Longformer, StreamingLLM's
    rolling rule): the set is the oracle's ``select`` (integer arithmetic on positions, no scores),
    the attention runs on the GPU. Returns ``(out [H_q, d], indices per query head)`` as NumPy."""
    qt, kt, vt = to_torch(q, "q"), to_torch(k, "k"), to_torch(v, "v")
    selection = method.select(np.asarray(q), np.asarray(k), np.asarray(v), positions=positions)
    out, _, rows = attend_mask(qt, kt, vt, selection_mask(selection, kt.shape[0], qt.device), scale=scale)
    return to_numpy(out), rows_per_query_head(rows, qt.shape[0])
