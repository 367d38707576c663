"""Saving and loading models built of SparseLoRALinear layers: one safetensors file (packed
tensors, adapters and the rest of the model), the transformers config, and `efx_sparse.json`
naming each packed module's format and settings. Writes are atomic."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from efx.model.arch import unwrap
from efx.io import atomic_folder
from efx.model.sparse_linear import BUFFER_PREFIX, SparseLoRALinear, _parent
from efx_kernels.formats import FORMAT_VERSION, PackedWeight, upgrade

WEIGHTS = "model.safetensors"
MANIFEST = "efx_sparse.json"


def save_sparse(model, folder: str | os.PathLike, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Write the packed checkpoint of `model` into `folder` (never half-written)."""
    from safetensors.torch import save_file

    inner = unwrap(model)
    modules = {name: m.config() for name, m in inner.named_modules() if isinstance(m, SparseLoRALinear)}
    if not modules:
        raise ValueError("the model holds no SparseLoRALinear layer: call efx.to_sparse_lora first")
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        inner.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(_state_once(inner), str(tmp / WEIGHTS),
                  metadata={"format": "pt", "efx_format_version": str(FORMAT_VERSION)})
        (tmp / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "modules": modules}, indent=1))
    return folder


def _state_once(model) -> dict:
    """The state dict with each shared tensor once, under the input embedding's name where it is
    that (a head tied to the embedding is stored as the embedding, which `load_sparse` ties back)."""
    state = model.state_dict()
    embedding = model.get_input_embeddings().weight
    first = sorted(state, key=lambda k: state[k] is not embedding and not (
        state[k].data_ptr() == embedding.data_ptr() and state[k].shape == embedding.shape))
    kept, seen = {}, set()
    for name in first:
        tensor = state[name]
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in seen:
            seen.add(key)
            kept[name] = tensor.contiguous()
    return kept


def load_sparse(folder: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_sparse`; returns (model, tokenizer or None).

    The model is built with its parameters on the meta device (no dense weight is ever allocated
    or initialized); the packed targets and every other tensor are then taken from the file as
    they are stored."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not an efx packed checkpoint (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{folder} uses packed format v{manifest['format_version']}; this efx reads up to "
                         f"v{FORMAT_VERSION}")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers such as rotary frequencies are computed, not stored
        model = AutoModelForCausalLM.from_config(config)
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
        for name, cfg in manifest["modules"].items():
            prefix = f"{name}.{BUFFER_PREFIX}"
            tensors = {k[len(prefix):]: handle.get_tensor(k) for k in keys if k.startswith(prefix)}
            packed = upgrade(PackedWeight(cfg["format"], tuple(cfg["shape"]), getattr(torch, cfg["dtype"]), tensors,
                                          cfg["version"]))
            bias = handle.get_tensor(f"{name}.bias") if cfg["bias"] else None
            module = SparseLoRALinear(packed, bias, r=cfg["r"], scale=cfg["scale"], dropout=cfg["dropout"])
            parent, child = _parent(model, name)
            setattr(parent, child, module)
    packed_prefixes = tuple(f"{name}.{BUFFER_PREFIX}" for name in manifest["modules"])
    state = {k: v for k, v in load_file(str(folder / WEIGHTS)).items() if not k.startswith(packed_prefixes)}
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head is stored once, under the embedding's name
    unexpected = list(result.unexpected_keys)
    missing = [n for n, p in model.named_parameters() if p.is_meta] + \
        [n for n, b in model.named_buffers() if b.is_meta]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer
