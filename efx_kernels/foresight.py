"""ForeSight score, |W + s*B@A| * stat * row_factor * col_factor blended with the previous score,
and the N:M keep-mask of scores.

Triton: the fused score works tile by tile; the B@A tile is formed on chip from r-long rows of
B and columns of A, so U = W + s*B@A never goes to memory: the kernel reads W (and prev) once and
writes the score once. A second kernel ranks scores inside groups of M columns and writes the N:M
keep-mask directly, without writing the score.

Tie rule of every selection in efx: among equal scores the lower column index is kept.
"""
from __future__ import annotations

import torch

from efx_kernels._triton import tl, triton
from efx_kernels.dispatch import use_triton
from efx_kernels.lora import effective_weight


def foresight_score(W, A, B, scale, act_stat, *, row_factor=None, col_factor=None, prev=None, eta=1.0,
                    out_dtype=None) -> torch.Tensor:
    """eta * |W + scale*B@A| * act_stat * row_factor * col_factor + (1-eta) * prev, (m, n).

    W (m, n) any float dtype; A (r, n), B (m, r) or None; act_stat (n,); row_factor (m,);
    col_factor (n,) or (groups, n), group g covering rows [g*m/groups, (g+1)*m/groups);
    prev (m, n). fp32 math; result in `out_dtype` (fp32 by default).
    """
    _check_score_inputs(W, act_stat, row_factor, col_factor, prev)
    if use_triton(W, A, B, act_stat):
        return foresight_score_triton(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)
    return _foresight_score_torch(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype)


def foresight_nm_keep_mask(W, A, B, scale, act_stat, n: int, m: int, *, row_factor=None, col_factor=None,
                           prev=None, eta=1.0) -> torch.Tensor:
    """N:M keep-mask (bool (rows, cols)) of the ForeSight score; on the Triton path the score is
    never written. Same arguments as `foresight_score`."""
    if W.shape[1] % m:
        raise ValueError(f"columns {W.shape[1]} not divisible by M={m}")
    _check_score_inputs(W, act_stat, row_factor, col_factor, prev)
    if use_triton(W, A, B, act_stat):
        return nm_keep_mask_fused(W, A, B, scale, act_stat, n, m, row_factor, col_factor, prev, eta)
    score = _foresight_score_torch(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, None)
    return nm_keep_mask(score, n, m)


def nm_keep_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores in each row (ties: the lower column is
    kept: a stable sort). bool, the shape of `score`."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"columns {cols} not divisible by M={m}")
    groups = score.float().reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def _check_score_inputs(W, act_stat, row_factor, col_factor, prev) -> None:
    m, n = W.shape
    if act_stat.shape != (n,):
        raise ValueError(f"act_stat must be ({n},), got {tuple(act_stat.shape)}")
    if row_factor is not None and row_factor.shape != (m,):
        raise ValueError(f"row_factor must be ({m},), got {tuple(row_factor.shape)}")
    if col_factor is not None and (col_factor.shape[-1] != n or (col_factor.dim() == 2 and m % col_factor.shape[0])):
        raise ValueError(f"col_factor must be ({n},) or (groups, {n}) with groups dividing {m}, "
                         f"got {tuple(col_factor.shape)}")
    if prev is not None and prev.shape != W.shape:
        raise ValueError(f"prev must match W's shape {tuple(W.shape)}, got {tuple(prev.shape)}")


# ---- torch reference ------------------------------------------------------------------

def expand_col_factor(col_factor: torch.Tensor, m: int) -> torch.Tensor:
    """A column factor of shape (n,) or per row group (groups, n) as an (m, n) or (1, n) tensor:
    group g covers rows [g*m/groups, (g+1)*m/groups)."""
    if col_factor.dim() == 1:
        return col_factor[None, :]
    return col_factor.repeat_interleave(m // col_factor.shape[0], dim=0)


def foresight_score_reference(W, A, B, scale, act_stat, row_factor=None, col_factor=None, prev=None, eta=1.0,
                              out_dtype=None) -> torch.Tensor:
    """The score as method.md writes it, in fp32."""
    m = W.shape[0]
    score = effective_weight(W, A, B, scale).abs() * act_stat.float()[None, :]
    if row_factor is not None:
        score = score * row_factor.float()[:, None]
    if col_factor is not None:
        score = score * expand_col_factor(col_factor.float(), m)
    if prev is not None:
        score = eta * score + (1.0 - eta) * prev.float()
    return score.to(out_dtype or torch.float32)


def _foresight_score_torch(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta, out_dtype) -> torch.Tensor:
    """The reference as one m x n tensor updated in place: each step is one pass over it, and no
    second m x n temporary is made (three times faster on a CPU)."""
    score = effective_weight(W, A, B, scale).abs_()
    score.mul_(act_stat.float()[None, :])
    if row_factor is not None:
        score.mul_(row_factor.float()[:, None])
    if col_factor is not None:
        score.mul_(expand_col_factor(col_factor.float(), W.shape[0]))
    if prev is not None and eta != 1.0:
        score.mul_(eta).add_(prev.to(score.device), alpha=1.0 - eta)
    return score.to(out_dtype or torch.float32)


# ---- Triton ---------------------------------------------------------------------------
@triton.jit
def _score_at(rows, cols, ok, w_ptr, a_ptr, b_ptr, stat_ptr, rowf_ptr, colf_ptr, prev_ptr, n_cols, rank, scale,
              eta, rows_per_group, stride_w, stride_a, stride_b, stride_colf, stride_prev,
              HAS_LORA: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, COL_GROUPED: tl.constexpr,
              HAS_PREV: tl.constexpr):
    """Score at the positions (rows, cols) (broadcastable index tensors, `ok` their mask)."""
    u = tl.load(w_ptr + rows * stride_w + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_LORA:
        ba = tl.zeros(u.shape, dtype=tl.float32)
        for k in range(0, rank):
            b = tl.load(b_ptr + rows * stride_b + k, mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + k * stride_a + cols, mask=ok, other=0.0).to(tl.float32)
            ba += b * a
        u += scale * ba
    score = tl.abs(u) * tl.load(stat_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_ROW:
        score *= tl.load(rowf_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    if HAS_COL:
        if COL_GROUPED:
            score *= tl.load(colf_ptr + (rows // rows_per_group) * stride_colf + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            score *= tl.load(colf_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_PREV:
        prev = tl.load(prev_ptr + rows * stride_prev + cols, mask=ok, other=0.0).to(tl.float32)
        score = eta * score + (1.0 - eta) * prev
    return score


@triton.jit
def _score_kernel(out_ptr, w_ptr, a_ptr, b_ptr, stat_ptr, rowf_ptr, colf_ptr, prev_ptr, n_rows, n_cols, rank, scale,
                  eta, rows_per_group, stride_out, stride_w, stride_a, stride_b, stride_colf, stride_prev,
                  HAS_LORA: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, COL_GROUPED: tl.constexpr,
                  HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    ok = (rows < n_rows) & (cols < n_cols)
    score = _score_at(rows, cols, ok, w_ptr, a_ptr, b_ptr, stat_ptr, rowf_ptr, colf_ptr, prev_ptr, n_cols, rank,
                      scale, eta, rows_per_group, stride_w, stride_a, stride_b, stride_colf, stride_prev,
                      HAS_LORA, HAS_ROW, HAS_COL, COL_GROUPED, HAS_PREV)
    tl.store(out_ptr + rows * stride_out + cols, score.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _nm_mask_kernel(keep_ptr, w_ptr, a_ptr, b_ptr, stat_ptr, rowf_ptr, colf_ptr, prev_ptr, n_rows, n_cols, rank,
                    scale, eta, rows_per_group, stride_keep, stride_w, stride_a, stride_b, stride_colf, stride_prev,
                    HAS_LORA: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
                    COL_GROUPED: tl.constexpr, HAS_PREV: tl.constexpr, KEEP_N: tl.constexpr, GROUP_M: tl.constexpr,
                    BLOCK_P: tl.constexpr):
    """Each program scores BLOCK_P (row, group) pairs, M columns each, and keeps the N best of
    every group (ties: the lower column wins)."""
    groups_per_row = n_cols // GROUP_M
    pair = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = (pair // groups_per_row)[:, None]
    lane = tl.arange(0, GROUP_M)[None, :]
    cols = (pair % groups_per_row)[:, None] * GROUP_M + lane
    ok = (rows < n_rows) & (cols < n_cols)
    score = _score_at(rows, cols, ok, w_ptr, a_ptr, b_ptr, stat_ptr, rowf_ptr, colf_ptr, prev_ptr, n_cols, rank,
                      scale, eta, rows_per_group, stride_w, stride_a, stride_b, stride_colf, stride_prev,
                      HAS_LORA, HAS_ROW, HAS_COL, COL_GROUPED, HAS_PREV)
    rank_in_group = tl.zeros(score.shape, dtype=tl.int32)
    for k in tl.static_range(GROUP_M):
        other = tl.sum(tl.where(lane == k, score, 0.0), axis=1)[:, None]
        beats = (other > score) | ((other == score) & (lane > k))
        rank_in_group += beats.to(tl.int32)
    tl.store(keep_ptr + rows * stride_keep + cols, (rank_in_group < KEEP_N).to(tl.int8), mask=ok)


def _launch_args(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta):
    m, n = W.shape
    has_lora = A is not None and B is not None and A.numel() > 0
    dummy = act_stat
    colf = col_factor if col_factor is not None else dummy
    grouped = col_factor is not None and col_factor.dim() == 2
    args = (W, A if has_lora else dummy, B if has_lora else dummy, act_stat,
            row_factor if row_factor is not None else dummy, colf, prev if prev is not None else dummy,
            m, n, A.shape[0] if has_lora else 0, float(scale), float(eta),
            m // col_factor.shape[0] if grouped else 1)
    strides = (W.stride(0), A.stride(0) if has_lora else 0, B.stride(0) if has_lora else 0,
               colf.stride(0) if grouped else 0, prev.stride(0) if prev is not None else 0)
    flags = dict(HAS_LORA=has_lora, HAS_ROW=row_factor is not None, HAS_COL=col_factor is not None,
                 COL_GROUPED=grouped, HAS_PREV=prev is not None and eta != 1.0)
    return args, strides, flags


def _contiguous(*tensors):
    return [t if t is None or t.is_contiguous() else t.contiguous() for t in tensors]


def foresight_score_triton(W, A, B, scale, act_stat, row_factor=None, col_factor=None, prev=None, eta=1.0,
                           out_dtype=None, block_m: int = 32, block_n: int = 128) -> torch.Tensor:
    """The fused score kernel (arguments of `foresight_score`)."""
    W, A, B, act_stat, row_factor, col_factor, prev = _contiguous(W, A, B, act_stat, row_factor, col_factor, prev)
    m, n = W.shape
    out = torch.empty((m, n), dtype=out_dtype or torch.float32, device=W.device)
    args, strides, flags = _launch_args(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _score_kernel[grid](out, *args, out.stride(0), *strides, **flags, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def nm_keep_mask_fused(W, A, B, scale, act_stat, n_keep: int, group: int, row_factor=None, col_factor=None,
                       prev=None, eta=1.0, block_p: int = 64) -> torch.Tensor:
    """N:M keep-mask (bool, (m, n)) of the ForeSight score, without writing the score."""
    W, A, B, act_stat, row_factor, col_factor, prev = _contiguous(W, A, B, act_stat, row_factor, col_factor, prev)
    m, n = W.shape
    keep = torch.empty((m, n), dtype=torch.int8, device=W.device)
    args, strides, flags = _launch_args(W, A, B, scale, act_stat, row_factor, col_factor, prev, eta)
    grid = (triton.cdiv(m * (n // group), block_p),)
    _nm_mask_kernel[grid](keep, *args, keep.stride(0), *strides, **flags, KEEP_N=n_keep, GROUP_M=group,
                          BLOCK_P=block_p)
    return keep.bool()
