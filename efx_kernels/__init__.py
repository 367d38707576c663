"""efx_kernels: the ops of pruning and of sparse-plus-LoRA matmuls, one file per op family, each
holding its Triton kernels, their launch wrappers and a torch reference; `dispatch.use_triton`
picks the path.

- act_stats: column second moments of activations (and E[x x^T]);
- foresight: the fused ForeSight score and N:M keep-masks;
- pbs: batched Partial Brain Surgeon updates;
- sparse_lora: the packed-base + LoRA matmul with autograd; formats: its packed formats.
"""
from efx_kernels.act_stats import accumulate_act_sq, accumulate_hessian
from efx_kernels.dispatch import triton_available, use_triton
from efx_kernels.foresight import foresight_nm_keep_mask, foresight_score, nm_keep_mask
from efx_kernels.formats import FORMATS, PackedWeight, pack
from efx_kernels.lora import effective_weight
from efx_kernels.pbs import hessian_pbs_delta, pbs_delta_general, pbs_delta_keep1, release_buffers
from efx_kernels.sparse_lora import sparse_lora_linear

__all__ = ["accumulate_act_sq", "accumulate_hessian", "foresight_score", "foresight_nm_keep_mask", "nm_keep_mask",
           "pbs_delta_keep1", "pbs_delta_general", "hessian_pbs_delta", "release_buffers", "effective_weight",
           "pack", "PackedWeight", "FORMATS", "sparse_lora_linear", "triton_available", "use_triton"]
