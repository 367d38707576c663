"""A sparse base with its trained LoRA adapter beside it, unmerged: saved as a Hugging Face folder
of the base (dense with zeros) holding a peft adapter folder `adapter/`, the form transformers +
peft, lm-eval (`pretrained=BASE,peft=BASE/adapter`) and vLLM with LoRA enabled load."""
from __future__ import annotations

from pathlib import Path

ADAPTER = "adapter"


def adapter_folder(model_folder: str | Path) -> Path | None:
    """`model_folder/adapter` when it holds a peft adapter, else None."""
    folder = Path(model_folder) / ADAPTER
    return folder if (folder / "adapter_config.json").is_file() else None


def save_with_adapter(model, tokenizer, folder: str | Path, *, is_main_process: bool = True):
    """Write the peft `model`'s adapter to `folder/adapter` and its base, without the adapter
    layers, to `folder`. The peft wrapping is removed in place (no copy of the weights); returns
    the plain base model. In a sharded job every rank calls it and the main process writes."""
    folder = Path(folder)
    model.save_pretrained(folder / ADAPTER, is_main_process=is_main_process)
    base = model.unload()
    base.save_pretrained(folder, is_main_process=is_main_process)
    if tokenizer is not None and is_main_process:
        tokenizer.save_pretrained(folder)
    return base


def load_adapter(model, folder: str | Path):
    """`model` (the base) with the peft adapter of `folder` attached, unmerged, for inference."""
    from peft import PeftModel
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no peft adapter (no adapter_config.json)")
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model.eval()
    return model
