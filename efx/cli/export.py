"""`efx export`: a saved expert as a dense-with-zeros Hugging Face folder and as a packed
SparseLoRALinear checkpoint; an expert with an unmerged adapter also as a peft adapter folder.

No `sparsity_config` goes into config.json (serving engines that read one expect a compressed
checkpoint and refuse or misread a dense one); the audit is written to efx's own file,
`efx_sparsity.json`, beside it."""
from __future__ import annotations

import logging
from pathlib import Path

import json

from efx.model.adapter import ADAPTER, adapter_folder, load_adapter
from efx.model.checkpoint import save_sparse
from efx.io import atomic_folder, check_output_free
from efx.model.loading import load_model, resolve_dtype
from efx.evaluation.report import sparsity_audit
from efx.model.sparse_linear import packed_format, to_sparse_lora
from efx_kernels.formats import FORMATS

log = logging.getLogger(__name__)

SPARSITY_FILE = "efx_sparsity.json"


def export(model_path: str, output: str, *, fmt: str = "auto", overwrite: bool = False,
           dtype: str | None = None, adapter: str | None = None) -> dict:
    """Write `<output>/hf` (loads with AutoModelForCausalLM, zeros kept, the audit in
    `efx_sparsity.json`) and `<output>/packed` (loads with efx.model.checkpoint.load_sparse) in
    format `fmt` ("auto": 2:4 where the zeros allow it, else bitmap), in `dtype` (default: the
    dtype the expert was saved in). The zeros already in the weights define the masks. An unmerged
    adapter (`adapter`, default: `<model_path>/adapter` when there is one) is written to
    `<output>/adapter` as a peft folder, kept unmerged in `packed` too. Returns the sparsity audit
    counted in the written `hf` files."""
    output = Path(output)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: expected auto or one of {FORMATS}")
    check_output_free(output, overwrite=overwrite)  # before the model is loaded
    if dtype is not None:
        resolve_dtype(dtype)
    adapter = Path(adapter) if adapter is not None else adapter_folder(model_path)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter} holds no peft adapter (no adapter_config.json)")
    model, tokenizer = load_model(model_path, dtype=dtype)
    with atomic_folder(output, overwrite=overwrite) as tmp:  # checked again: the load took time
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        audit = sparsity_audit(model, tmp / "hf")
        (tmp / "hf" / SPARSITY_FILE).write_text(json.dumps(
            {"format": "dense with zeros", "unmerged_adapter": ADAPTER if adapter else None, **audit}, indent=1))
        if adapter is not None:
            model = load_adapter(model, adapter)
            model.save_pretrained(tmp / ADAPTER)
        fmt = packed_format(model) if fmt == "auto" else fmt
        to_sparse_lora(model, format=fmt, rank=0)
        save_sparse(model, tmp / "packed", tokenizer)
    log.info("exported %s (sparsity %.4f, packed %s) to %s", model_path, audit["overall"], fmt, output)
    return audit
