"""efx: turn a general pretrained LLM into a sparse, domain-adapted expert in one LoRA
fine-tuning run (EfficientXpert: ForeSight Mask + Partial Brain Surgeon)."""
import logging

from efx.model.arch import architecture_map
from efx.data.suites import Suite, load_suite
from efx.evaluation.evaluate import evaluate, retention
from efx.model.loading import load_model
from efx.method.prune import PruneConfig, PruneMemory, PruneReport, prune
from efx.training import LoraSettings, TrainSettings, train_lora

__version__ = "0.1.0"
__all__ = ["architecture_map", "Suite", "load_suite", "evaluate", "retention", "load_model", "PruneConfig",
           "PruneMemory", "PruneReport", "prune", "LoraSettings", "TrainSettings", "train_lora",
           "EfficientXpertCallback", "prune_and_adapt", "SparseLoRALinear", "to_sparse_lora"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name):
    # Heavier pieces load on first use so `import efx` stays light.
    if name == "EfficientXpertCallback":
        from efx.method.schedule import EfficientXpertCallback
        return EfficientXpertCallback
    if name == "prune_and_adapt":
        from efx.recipes import prune_and_adapt
        return prune_and_adapt
    if name in ("SparseLoRALinear", "to_sparse_lora"):
        from efx.model import sparse_linear
        return getattr(sparse_linear, name)
    raise AttributeError(f"module 'efx' has no attribute {name!r}")
