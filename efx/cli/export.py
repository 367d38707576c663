"""`efx export`: a saved expert as a dense-with-zeros Hugging Face folder and as a packed
SparseLoRALinear checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

from efx.model.checkpoint import save_sparse
from efx.io import atomic_folder, check_output_free
from efx.model.loading import load_model, resolve_dtype
from efx.evaluation.report import sparsity_audit
from efx.model.sparse_linear import to_sparse_lora

log = logging.getLogger(__name__)


def export(model_path: str, output: str, *, fmt: str = "bitmap", overwrite: bool = False,
           dtype: str | None = None) -> dict:
    """Write `<output>/hf` (loads with AutoModelForCausalLM, zeros kept) and `<output>/packed`
    (loads with efx.model.checkpoint.load_sparse), in `dtype` (default: the dtype the expert was
    saved in). The zeros already in the weights define the masks. Returns the sparsity audit
    counted in the written `hf` files."""
    output = Path(output)
    check_output_free(output, overwrite=overwrite)  # before the model is loaded
    if dtype is not None:
        resolve_dtype(dtype)
    model, tokenizer = load_model(model_path, dtype=dtype)
    with atomic_folder(output, overwrite=overwrite) as tmp:  # checked again: the load took time
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        audit = sparsity_audit(model, tmp / "hf")
        to_sparse_lora(model, format=fmt, rank=0)
        save_sparse(model, tmp / "packed", tokenizer)
    log.info("exported %s (sparsity %.4f) to %s", model_path, audit["overall"], output)
    return audit
