"""efx: turn a general pretrained LLM into a sparse, domain-adapted expert in one LoRA
fine-tuning run (EfficientXpert: ForeSight Mask + Partial Brain Surgeon)."""
import logging

from efx.arch import architecture_map
from efx.data import Suite, load_suite
from efx.evaluate import evaluate, retention
from efx.models import load_model
from efx.prune import PruneConfig, PruneMemory, PruneReport, prune
from efx.training import LoraSettings, TrainSettings, train_lora

__version__ = "0.1.0"
__all__ = ["architecture_map", "Suite", "load_suite", "evaluate", "retention", "load_model", "PruneConfig",
           "PruneMemory", "PruneReport", "prune", "LoraSettings", "TrainSettings", "train_lora",
           "EfficientXpertCallback", "prune_and_adapt", "SparseLoRALinear", "to_sparse_lora"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    # Heavier pieces load on first use so `import efx` stays light.
    if name == "EfficientXpertCallback":
        from efx.callback import EfficientXpertCallback
        return EfficientXpertCallback
    if name == "prune_and_adapt":
        from efx.pipelines import prune_and_adapt
        return prune_and_adapt
    if name in ("SparseLoRALinear", "to_sparse_lora"):
        from efx import sparse_linear
        return getattr(sparse_linear, name)
    raise AttributeError(f"module 'efx' has no attribute {name!r}")
