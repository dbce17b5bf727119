"""Fused attention block with pruned heads and channels:
    out = x + gamma * proj(MHA(LayerNorm(x)))

Head h attends with softmax(scale * q_h k_h^T + key_bias[b]) v_h, where q_h and k_h have
width qk_dims[h] and v_h width v_dims[h]; widths may differ per head (UVC prunes each head
separately) or be uniform (CAIT's CDCP). qkv rows are packed [q_0|q_1|..|k_0|k_1|..|v_0|..]
with each head's rows contiguous; the context heads are concatenated in head order.
key_bias (B, N) is ToMe's proportional attention (log of each key's token count).

Three Triton launches:
  1. `_ln_linear_kernel` (fused_linear): LayerNorm in the qkv GEMM's prologue, bias in its
     epilogue; writes the packed (B*N, 2*sum(qk)+sum(v)) qkv rows.
  2. `_flash_attention_kernel`: one program per (batch*head, q-block), online softmax over
     key blocks with fp32 statistics and accumulator. Heads are grouped by their widths
     padded to the next power of two (>= 16 for tl.dot); each group is one launch with a
     per-head table of column offsets and true widths, and channels past a head's width
     are masked. So removing heads removes programs and narrowing heads shrinks tiles.
  3. `_linear_residual_kernel` (fused_linear): proj GEMM with bias, LayerScale and the
     residual add in the epilogue.
"""
import torch
import triton
import triton.language as tl

from .fused_linear import dot_precision, dot_upcast, linear_residual, ln_linear

_LOG2E = 1.4426950408889634
_MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16

# Rows of a head table (int32, shape (_TABLE_ROWS, heads in the group)).
_Q_COL, _K_COL, _V_COL, _OUT_COL, _QK_WIDTH, _V_WIDTH = range(6)
_TABLE_ROWS = 6


def attention_context_ref(qkv, qk_dims, v_dims, scale, key_bias=None):
    """Plain-PyTorch attention core: packed qkv (B, N, 2*sum(qk)+sum(v)) -> (B, N, sum(v)),
    one head at a time."""
    qk_total = sum(qk_dims)
    q, k, v = qkv.split([qk_total, qk_total, sum(v_dims)], dim=-1)
    heads = []
    for q_h, k_h, v_h in zip(q.split(qk_dims, -1), k.split(qk_dims, -1), v.split(v_dims, -1)):
        logits = (q_h @ k_h.transpose(-2, -1)) * scale
        if key_bias is not None:
            logits = logits + key_bias[:, None, :]
        heads.append(logits.softmax(dim=-1) @ v_h)
    return torch.cat(heads, dim=-1)


def attention_block_ref(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias,
                        qk_dims, v_dims, scale, gamma=None, key_bias=None, eps=1e-6):
    """Plain-PyTorch definition of the op (timm's Block attention branch with its residual)."""
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    qkv = torch.nn.functional.linear(h, qkv_weight, qkv_bias)
    ctx = attention_context_ref(qkv, qk_dims, v_dims, scale, key_bias)
    y = torch.nn.functional.linear(ctx, proj_weight, proj_bias)
    return x + (y * gamma if gamma is not None else y)


@triton.jit
def _flash_attention_kernel(
    qkv_ptr, table_ptr, key_bias_ptr, ctx_ptr,
    N, GROUP_HEADS, qk_scale_log2,
    stride_qkv, stride_ctx, stride_key_bias,
    HAS_KEY_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(N, BLOCK_M)
    # q-blocks of one (batch, head) are adjacent, so they run together and share K/V in L2.
    pid_bh = pid // num_m
    pid_m = pid % num_m
    batch = pid_bh // GROUP_HEADS
    slot = pid_bh % GROUP_HEADS
    q_col = tl.load(table_ptr + 0 * GROUP_HEADS + slot).to(tl.int64)
    k_col = tl.load(table_ptr + 1 * GROUP_HEADS + slot).to(tl.int64)
    v_col = tl.load(table_ptr + 2 * GROUP_HEADS + slot).to(tl.int64)
    out_col = tl.load(table_ptr + 3 * GROUP_HEADS + slot).to(tl.int64)
    qk_width = tl.load(table_ptr + 4 * GROUP_HEADS + slot)
    v_width = tl.load(table_ptr + 5 * GROUP_HEADS + slot)

    first_row = batch * N
    queries = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    query_ok = queries < N
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    dqk_ok = dqk < qk_width
    dv_ok = dv < v_width

    q = tl.load(qkv_ptr + (first_row + queries)[:, None] * stride_qkv + q_col + dqk[None, :],
                mask=query_ok[:, None] & dqk_ok[None, :], other=0.0)
    if DOT_UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < N
        key_rows = first_row + keys
        k_t = tl.load(qkv_ptr + key_rows[None, :] * stride_qkv + k_col + dqk[:, None],
                      mask=key_ok[None, :] & dqk_ok[:, None], other=0.0)
        if DOT_UPCAST:
            s = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        # Logits in log2 units: exp2 is the GPU's native exponential.
        s = s * qk_scale_log2
        if HAS_KEY_BIAS:
            kb = tl.load(key_bias_ptr + batch * stride_key_bias + keys, mask=key_ok, other=0.0)
            s = s + kb.to(tl.float32)[None, :] * 1.4426950408889634
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # The first key block always holds a valid key, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(qkv_ptr + key_rows[:, None] * stride_qkv + v_col + dv[None, :],
                    mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        if DOT_UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
        else:
            # Probabilities in the input precision for the tensor cores, as flash-attention.
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(ctx_ptr + (first_row + queries)[:, None] * stride_ctx + out_col + dv[None, :],
             acc.to(ctx_ptr.dtype.element_ty), mask=query_ok[:, None] & dv_ok[None, :])


def _padded_width(width):
    return max(_MIN_DOT_WIDTH, triton.next_power_of_2(width))


def head_groups(qk_dims, v_dims):
    """Heads grouped by padded (qk, v) widths: [(block_dqk, block_dv, table rows)], where the
    table rows are the six int lists (q col, k col, v col, ctx col, qk width, v width)."""
    qk_total = sum(qk_dims)
    groups = {}
    q_col, v_col = 0, 0
    for qk_w, v_w in zip(qk_dims, v_dims):
        key = (_padded_width(qk_w), _padded_width(v_w))
        rows = groups.setdefault(key, [[] for _ in range(_TABLE_ROWS)])
        for row, value in zip(rows, (q_col, qk_total + q_col, 2 * qk_total + v_col, v_col, qk_w, v_w)):
            row.append(value)
        q_col += qk_w
        v_col += v_w
    return [(dqk, dv, rows) for (dqk, dv), rows in groups.items()]


# Head tables per (qk_dims, v_dims, device), built once: rebuilding one would copy host
# memory to the GPU on every call, which a CUDA graph capture does not allow.
_TABLE_CACHE: dict = {}


def _head_tables(qk_dims, v_dims, device):
    key = (tuple(qk_dims), tuple(v_dims), str(device))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        return cached
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "attention_block (triton): first call with these head widths happened during CUDA "
            "graph capture; run the op once (warm-up) before capturing")
    tables = [(dqk, dv, torch.tensor(rows, dtype=torch.int32, device=device))
              for dqk, dv, rows in head_groups(qk_dims, v_dims)]
    # Under torch.compile's tracing the tables come out as fake tensors; keep real ones only.
    if all(type(table) is torch.Tensor for _, _, table in tables):
        _TABLE_CACHE[key] = tables
    return tables


def _attention_tile_config(device_type, block_dqk, block_dv):
    """Tile sizes. On the GPU: 64x64 query/key tiles with 4 warps (the flash-attention forward
    setting for head widths <= 64; 197 tokens waste less of 64-row tiles than of 128-row ones).
    Under the CPU interpreter tiles stay small."""
    if device_type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    wide = max(block_dqk, block_dv) > 64
    return dict(BLOCK_M=64, BLOCK_N=64 if not wide else 32, num_warps=4, num_stages=3)


def flash_attention_triton(qkv, batch, tokens, qk_dims, v_dims, scale, key_bias=None,
                           ctx=None, kernel_launcher=None):
    """Attention core on packed qkv rows (B*N, 2*sum(qk)+sum(v)) (unit column stride) ->
    context rows (B*N, sum(v)), written into `ctx` when given."""
    launch = kernel_launcher or (lambda kernel: kernel)
    if ctx is None:
        ctx = torch.empty((batch * tokens, sum(v_dims)), device=qkv.device, dtype=qkv.dtype)
    for block_dqk, block_dv, table in _head_tables(qk_dims, v_dims, qkv.device):
        group_heads = table.shape[1]
        cfg = _attention_tile_config(qkv.device.type, block_dqk, block_dv)
        grid = (batch * group_heads * triton.cdiv(tokens, cfg["BLOCK_M"]),)
        launch(_flash_attention_kernel)[grid](
            qkv, table, key_bias if key_bias is not None else qkv, ctx,
            tokens, group_heads, scale * _LOG2E,
            qkv.stride(0), ctx.stride(0), key_bias.stride(0) if key_bias is not None else 0,
            HAS_KEY_BIAS=key_bias is not None, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
            DOT_PRECISION=dot_precision(qkv.dtype), DOT_UPCAST=dot_upcast(qkv.device.type, qkv.dtype),
            **cfg,
        )
    return ctx


def attention_block_triton(x, norm_weight, norm_bias, qkv_weight, qkv_bias, proj_weight,
                           proj_bias, qk_dims, v_dims, scale, gamma=None, key_bias=None,
                           eps=1e-6, out=None, kernel_launcher=None):
    """Runs the three fused launches on x (B, N, D); writes into `out` when given (tests
    poison it). `kernel_launcher` wraps each kernel for torch.library.triton_op."""
    launch = kernel_launcher or (lambda kernel: kernel)
    batch, tokens, dim = x.shape
    rows_in = x.reshape(-1, dim)
    if not rows_in.is_contiguous():
        rows_in = rows_in.contiguous()
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if key_bias is not None and key_bias.stride(-1) != 1:
        key_bias = key_bias.contiguous()
    qkv = ln_linear(rows_in, norm_weight, norm_bias, qkv_weight, qkv_bias, eps, gelu=False,
                    launch=launch)
    ctx = flash_attention_triton(qkv, batch, tokens, qk_dims, v_dims, scale, key_bias,
                                 kernel_launcher=launch)
    linear_residual(ctx, proj_weight, proj_bias, gamma, rows_in, out.view(-1, dim), launch=launch)
    return out
