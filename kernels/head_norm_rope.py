"""The attention block's per-token extras around the attention core (timm's EvaAttention):

  q/k-norm     timm's `q_norm` / `k_norm`: a LayerNorm over each head's q (and k) channels,
               one (weight, bias) pair of the head width shared by all heads;
  RoPE         rotary position embedding on q and k, after q/k-norm (as timm applies it);
  inner norm   timm's `attn.norm`: a LayerNorm over the concatenated heads' context
               (width sum(v_dims)) before proj.

RoPE contract (the op's `rope_cos`, `rope_sin`, `rope_index`): float32 tables (P, QK), QK =
sum(qk_dims) in the packed q channel layout (head h's columns where its q channels are), one
row per position; `rope_index` (B, T) int gives the row each token uses (None: token t uses
row t, then P == T). Within a head of width d (even), channel i < d/2 pairs with i + d/2
(timm's `rope_rotate_half`):
    q'_i       = q_i * cos_i - q_{i+d/2} * sin_i
    q'_{i+d/2} = q_{i+d/2} * cos_{i+d/2} + q_i * sin_{i+d/2}
and k the same. Prefix tokens get rows with cos = 1, sin = 0; the op knows nothing of them.
The product is taken in fp32 (fp64 for fp64 inputs) and rounded once to q's dtype, as timm's
`apply_rot_embed` promotes to its float32 tables.

Triton: `qk_norm_rope_` applies q/k-norm and RoPE in place on the packed qkv rows between the
qkv GEMM and the flash kernel, one program per (row block, head) for q and for k, so every
key is rotated once (inside the flash kernel's key loop it would be rotated once per query
block, with two extra table tiles and a partner tile loaded per step of the main loop). It
reads the heads at their padded columns (kernels/head_padding.py) and normalizes over the
real width only, leaving the zero padding zero. `inner_norm_` normalizes the context rows in
place the same way, over the real channels of padded heads.
"""
import torch
import triton
import triton.language as tl

from .head_padding import pad_head_vector

# ---- plain-PyTorch reference ------------------------------------------------------------


def head_norm(t, norm, eps):
    """timm's q_norm / k_norm on one head (..., d): LayerNorm over d; `norm` = (weight, bias)
    or None (identity)."""
    if norm is None:
        return t
    return torch.nn.functional.layer_norm(t, (t.shape[-1],), norm[0], norm[1], eps)


def rope_rows(table, index, tokens):
    """The table rows each token uses: (B, T, QK) gathered by `index` (B, T), or the first
    `tokens` rows (1, T, QK) when index is None."""
    if index is None:
        return table[:tokens].unsqueeze(0)
    return table[index.long()]


def rotate_half_ref(t, cos, sin):
    """t * cos + rotate_half(t) * sin on one head's channels (..., d), computed in t's dtype
    promoted with the table's (float32), rounded once to t's dtype."""
    wide = torch.promote_types(t.dtype, cos.dtype)
    half = t.shape[-1] // 2
    t = t.to(wide)
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos.to(wide) + rotated * sin.to(wide)


# ---- Triton ------------------------------------------------------------------------------


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr, table_ptr, norm_w_ptr, norm_b_ptr, cos_ptr, sin_ptr, index_ptr,
    M, TOKENS, HEADS, part_col, eps, stride_qkv, stride_rope,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One (row block, head) of q (part_col 0) or k (part_col: the first k column), in place.
    # table: three int rows (column in the packed qkv rows, real width, column in the RoPE
    # table), one column per head.
    pid_m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    col = tl.load(table_ptr + head).to(tl.int64) + part_col
    width = tl.load(table_ptr + HEADS + head)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    c = tl.arange(0, BLOCK_D)
    c_ok = c < width
    ok = row_ok[:, None] & c_ok[None, :]
    half = width // 2
    # each channel's rotation partner (rotate_half: i <-> i + d/2)
    partner = tl.where(c < half, c + half, c - half)
    row_ptrs = qkv_ptr + rows[:, None] * stride_qkv + col
    t = tl.load(row_ptrs + c[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_ROPE:
        tp = tl.load(row_ptrs + partner[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(t, axis=1) / width
        centred = tl.where(ok, t - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
        w = tl.load(norm_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        b = tl.load(norm_b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        t = centred * rstd[:, None] * w[None, :] + b[None, :]
        if HAS_ROPE:
            wp = tl.load(norm_w_ptr + partner, mask=c_ok, other=0.0).to(tl.float32)
            bp = tl.load(norm_b_ptr + partner, mask=c_ok, other=0.0).to(tl.float32)
            tp = (tp - mean[:, None]) * rstd[:, None] * wp[None, :] + bp[None, :]
    if HAS_ROPE:
        if HAS_INDEX:
            pos = tl.load(index_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            pos = rows % TOKENS
        rope_col = tl.load(table_ptr + 2 * HEADS + head).to(tl.int64)
        rope_ptrs = pos[:, None] * stride_rope + rope_col + c[None, :]
        cos = tl.load(cos_ptr + rope_ptrs, mask=ok, other=1.0)
        sin = tl.load(sin_ptr + rope_ptrs, mask=ok, other=0.0)
        t = t * cos + tl.where((c < half)[None, :], -tp, tp) * sin
    tl.store(row_ptrs + c[None, :], t.to(qkv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _inner_norm_kernel(
    ctx_ptr, w_ptr, b_ptr, real_ptr, M, WIDTH, count, eps, stride_ctx,
    PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # LayerNorm of BLOCK_M context rows in place over their `count` real channels; PADDED:
    # real_ptr marks them (1.0) among the WIDTH columns of zero-padded heads, whose padding
    # columns (weight and bias 0 there) stay 0.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    row_ptrs = ctx_ptr + rows[:, None] * stride_ctx
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, WIDTH, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < WIDTH)[None, :]
        acc += tl.sum(tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0).to(tl.float32), axis=1)
    mean = acc / count
    acc_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, WIDTH, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < WIDTH)[None, :]
        if PADDED:
            ok = ok & (tl.load(real_ptr + cols, mask=cols < WIDTH, other=0.0) != 0)[None, :]
        x = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        centred = tl.where(ok, x - mean[:, None], 0.0)
        acc_sq += tl.sum(centred * centred, axis=1)
    rstd = 1.0 / tl.sqrt(acc_sq / count + eps)
    for k in range(0, WIDTH, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        col_ok = cols < WIDTH
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(row_ptrs + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(row_ptrs + cols[None, :], y.to(ctx_ptr.dtype.element_ty), mask=ok)


# Int tables per (content, device), built once: rebuilding one would copy host memory to the
# GPU on every call, which a CUDA graph capture does not allow.
_TABLE_CACHE: dict = {}


def cached_int_table(rows: tuple, device) -> torch.Tensor:
    """An int32 tensor of `rows` (a tuple of equal-length int tuples) on `device`, made once."""
    key = (rows, str(device))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "attention_block (triton): first call with these head widths happened during CUDA "
            "graph capture; run the op once (warm-up) before capturing")
    table = torch.tensor(rows, dtype=torch.int32, device=device)
    # Under torch.compile's tracing the table comes out as a fake tensor; keep real ones only.
    if type(table) is torch.Tensor:
        _TABLE_CACHE[key] = table
    return table


def _row_tile(device_type, width):
    # rows per program: enough to give a warp whole 16-byte vectors, few enough for registers
    if device_type != "cuda":
        return 16, 1
    return (32 if width <= 64 else 16), 4


def qk_norm_rope_(qkv, tokens, real_dims, padded_dims, q_norm, k_norm, eps, rope, *, launch):
    """In place on packed qkv rows (B*T, 2*sum(padded_dims)+...) (unit column stride): q/k-norm
    ((weight, bias) pairs or None) then RoPE (`rope` = (cos, sin, index or None), or None) on
    every head's real channels; see the module docstring."""
    rows, heads = qkv.shape[0], len(real_dims)
    cols = [sum(padded_dims[:h]) for h in range(heads)]
    rope_cols = [sum(real_dims[:h]) for h in range(heads)]
    table = cached_int_table((tuple(cols), tuple(real_dims), tuple(rope_cols)), qkv.device)
    block_m, warps = _row_tile(qkv.device.type, max(real_dims))
    block_d = max(16, triton.next_power_of_2(max(real_dims)))
    cos, sin, index = rope if rope is not None else (qkv, qkv, None)
    if index is not None and not index.is_contiguous():
        index = index.contiguous()
    grid = (triton.cdiv(rows, block_m), heads)
    for part_col, norm in ((0, q_norm), (sum(padded_dims), k_norm)):
        weight, bias = norm if norm is not None else (qkv, qkv)
        launch(_qk_norm_rope_kernel)[grid](
            qkv, table, weight, bias, cos, sin, index if index is not None else qkv,
            rows, tokens, heads, part_col, eps, qkv.stride(0), cos.stride(0) if rope else 0,
            HAS_NORM=norm is not None, HAS_ROPE=rope is not None, HAS_INDEX=index is not None,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return qkv


def inner_norm_(ctx, real_dims, padded_dims, weight, bias, eps, *, launch):
    """In place on context rows (M, sum(padded_dims)) (unit column stride): LayerNorm over the
    real channels (weight, bias: (sum(real_dims),)); zero-padded heads stay zero-padded."""
    padded = list(padded_dims) != list(real_dims)
    real = weight
    if padded:
        real = pad_head_vector(torch.ones(sum(real_dims), device=ctx.device), real_dims, padded_dims)
        weight = pad_head_vector(weight, real_dims, padded_dims)
        bias = pad_head_vector(bias, real_dims, padded_dims)
    rows, width = ctx.shape
    gpu = ctx.device.type == "cuda"
    block_m, block_d = (4, 256) if gpu else (16, 64)
    launch(_inner_norm_kernel)[(triton.cdiv(rows, block_m),)](
        ctx, weight, bias, real, rows, width, sum(real_dims), eps,
        ctx.stride(0), PADDED=padded, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=4 if gpu else 1)
    return ctx
