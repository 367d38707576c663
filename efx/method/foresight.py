"""ForeSight Mask (method.md section 3): a backprop-free score on the LoRA-augmented weight
U = W + s*B@A that also weighs how much the module consuming each output relies on it, and
the selection of an exactly sparse keep-mask from scores."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

import efx_kernels
from efx.model.arch import ArchMap, BlockMap, base_linear, lora_parts, module_weight
from efx.method.statistics import ModuleStats

PRESETS = ("efx", "paper")
GRANULARITIES = ("row", "matrix")


@dataclass
class Factors:
    """Propagation factors of one target: `row` (m,) and/or `col`, (n,) or (groups, n) with
    each group covering m/groups consecutive rows."""

    row: torch.Tensor | None = None
    col: torch.Tensor | None = None


def _col_norms(U: torch.Tensor) -> torch.Tensor:
    return U.norm(dim=0)


def propagation_factors(arch: ArchMap, block: BlockMap, role: str, preset: str = "efx") -> Factors:
    """The factors of method.md section 3 from the partners' current effective weights.

    "efx": row factors only (who reads output i, and how strongly). "paper": the authors'
    column-indexed partner factors for q, k, gate and up, row factors for v and o.
    """
    if not arch.supported or role == "down":
        return Factors()
    scaled = preset == "efx"
    U = lambda r: module_weight(block.targets[r], scaled=scaled)  # noqa: E731
    h_q, h_kv, d, group = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.group_size
    if preset == "efx":
        if role == "q":  # row (h, e) meets key row (g(h), e)
            k_rows = U("k").norm(dim=1).reshape(h_kv, 1, d)
            return Factors(row=k_rows.expand(h_kv, group, d).reshape(-1))
        if role == "k":
            q_sq = U("q").pow(2).sum(dim=1).reshape(h_kv, group, d)
            return Factors(row=q_sq.sum(dim=1).sqrt().reshape(-1))
        if role == "v":  # output (g, e) is read by o's columns (h, e), h in group g
            o_sq = U("o").pow(2).sum(dim=0).reshape(h_kv, group, d)
            return Factors(row=o_sq.sum(dim=1).sqrt().reshape(-1))
        if role == "o":
            return Factors(row=(U("gate").pow(2).sum(dim=0) + U("up").pow(2).sum(dim=0)).sqrt())
        if role in ("gate", "up"):
            return Factors(row=_col_norms(U("down")))
    elif preset == "paper":
        if role == "q":  # per query head h, column j: norm over kv head g(h)'s rows of U_k
            n = base_linear(block.targets["k"]).in_features
            k_heads = U("k").reshape(h_kv, d, n).norm(dim=1)
            return Factors(col=k_heads.repeat_interleave(group, dim=0))
        if role == "k":
            n = base_linear(block.targets["q"]).in_features
            q_heads_sq = U("q").reshape(h_q, d, n).pow(2).sum(dim=1).reshape(h_kv, group, n)
            return Factors(col=q_heads_sq.mean(dim=1).sqrt())
        if role == "v":
            o_sq = U("o").pow(2).sum(dim=0).reshape(h_kv, group, d)
            return Factors(row=o_sq.mean(dim=1).sqrt().reshape(-1))
        if role == "o":
            return Factors(row=(U("gate").norm(dim=0) + U("up").norm(dim=0)) / 2)
        if role in ("gate", "up"):  # row j of down, indexed by the input feature j
            return Factors(col=U("down").norm(dim=1))
    else:
        raise ValueError(f"unknown ForeSight preset {preset!r}; expected one of {PRESETS}")
    return Factors()


def activation_statistic(stats: ModuleStats, preset: str) -> torch.Tensor:
    """sqrt(E[x_j^2]) for "efx"; the authors' sqrt(sum_t x_j^2 / N_sequences) for "paper"."""
    if preset == "paper":
        return (stats.sq_sum / max(stats.sequences, 1)).sqrt()
    return stats.act_sq.sqrt()


def score_inputs(arch: ArchMap, block: BlockMap, role: str, stats: ModuleStats, preset: str = "efx",
                 adapter: bool = True) -> dict:
    """The arguments of the fused score kernel for one target: W, A, B, the scale (1 for the
    "paper" preset, whose U omits it), the activation statistic and the propagation factors.
    `adapter` False scores W alone (the adapter stays beside the base, unpruned); the partners'
    factors still see their adapters."""
    module = block.targets[role]
    weight = base_linear(module).weight
    parts = lora_parts(module) if adapter else None
    A, B, scale = parts if parts is not None else (None, None, 0.0)
    factors = propagation_factors(arch, block, role, preset)
    return {"W": weight, "A": A, "B": B, "scale": 1.0 if preset == "paper" else scale,
            "act_stat": activation_statistic(stats, preset).to(weight.device),
            "row_factor": factors.row, "col_factor": factors.col}


def foresight_score(arch: ArchMap, block: BlockMap, role: str, stats: ModuleStats, preset: str = "efx",
                    prev: torch.Tensor | None = None, eta: float = 1.0, adapter: bool = True) -> torch.Tensor:
    """I = |U| * stat_j * f for one target, blended with `prev` as eta*I + (1-eta)*prev (fp32)."""
    inputs = score_inputs(arch, block, role, stats, preset, adapter)
    return efx_kernels.foresight_score(**inputs, prev=None if prev is None else prev.to(inputs["W"].device),
                                       eta=eta if prev is not None else 1.0)


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) for "N:M", None for "unstructured"."""
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r}: expected 'unstructured' or 'N:M' such as '2:4'") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: N:M needs 0 < N < M")
    return n, m


def pruned_count(n: int, sparsity: float) -> int:
    """floor(n * sparsity), computed on the decimal the user wrote: floor(100 * 0.29) is 29, not the
    28 that binary floating point gives."""
    return math.floor(Fraction(repr(float(sparsity))) * n)


def _kth_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of every row, (rows, 1). Over many rows an unsorted top-k
    of the shorter side and its extreme selects about 15% faster on a CPU than `kthvalue`, which
    stays faster over a single long row."""
    n = score.shape[1]
    if score.shape[0] == 1:
        return score.kthvalue(k, dim=1, keepdim=True).values
    if k <= n - k + 1:
        return score.topk(k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    return score.topk(n - k + 1, dim=1, largest=True, sorted=False).values.amin(1, keepdim=True)


def _keep_all_but_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the k lowest scores of every row; among scores equal to a row's k-th
    lowest, the higher column index is pruned first (the lower one is kept). A threshold rather
    than a sort: the tie pass runs only for rows that need it."""
    if k <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    threshold = _kth_smallest(score, k)
    pruned = score <= threshold
    tied = (pruned.count_nonzero(1) != k).nonzero().flatten()
    if tied.numel():  # ties at the threshold in these rows: prune the last ones only
        rows, limit = score[tied], threshold[tied]
        below, at = rows < limit, rows == limit
        need = k - below.sum(1, keepdim=True)
        counts = torch.int16 if rows.shape[1] < 2**15 else torch.int64  # the running count of a row fits
        from_the_right = at.flip(1).cumsum(1, dtype=counts).flip(1)
        pruned[tied] = below | (at & (from_the_right <= need))
    return ~pruned


def select_keep_mask(score: torch.Tensor, sparsity: float, pattern: str = "unstructured",
                     granularity: str = "row") -> torch.Tensor:
    """Boolean keep-mask (True = kept) pruning the lowest scores, with exact counts.

    unstructured/row: floor(n*p) per row; unstructured/matrix: floor(m*n*p) in the matrix;
    N:M: M-N per group of M consecutive columns in every row. One tie rule everywhere: among
    equal scores the lower (flat) index is kept, so masks are deterministic.
    """
    nm = parse_pattern(pattern)
    rows, cols = score.shape
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"in_features {cols} is not divisible by M={nm[1]} of pattern {pattern}")
        return efx_kernels.nm_keep_mask(score, *nm)
    score = score.float()
    if granularity == "row":
        return _keep_all_but_lowest(score, pruned_count(cols, sparsity))
    if granularity == "matrix":
        return _keep_all_but_lowest(score.reshape(1, -1), pruned_count(rows * cols, sparsity)).reshape(rows, cols)
    raise ValueError(f"granularity {granularity!r}: expected one of {GRANULARITIES}")
