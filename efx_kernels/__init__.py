"""efx_kernels: Triton kernels for pruning and for sparse-plus-LoRA matmuls, their torch
references, and the one place that picks between them (dispatch)."""
from efx_kernels.dispatch import triton_available, use_triton
from efx_kernels.formats import FORMATS, PackedWeight, pack
from efx_kernels.scratch import release as release_scratch
from efx_kernels.ops import (accumulate_act_sq, accumulate_hessian, foresight_nm_keep_mask, foresight_score,
                             hessian_pbs_delta, nm_keep_mask, pbs_delta_general, pbs_delta_keep1)

from efx_kernels.sparse_lora import sparse_lora_linear

__all__ = ["pack", "PackedWeight", "FORMATS", "sparse_lora_linear", "accumulate_act_sq", "accumulate_hessian", "foresight_score", "foresight_nm_keep_mask", "nm_keep_mask", "pbs_delta_keep1",
           "pbs_delta_general", "hessian_pbs_delta", "triton_available", "use_triton", "release_scratch"]
