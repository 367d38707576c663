"""Run by tests/test_fsdp.py, alone (world 1) or under `torchrun --nproc_per_node=2` (gloo, CPU,
the model sharded with FSDP2 as it loads): EfficientXpert inside LoRA training of a tiny model
on the same data either way (the same 8 examples per optimizer step, no dropout), then the
merged model's full state saved by rank 0.

    fsdp_worker.py MODEL_DIR OUT_DIR [nan]   # nan: rank 1's shard of one weight holds a NaN at train end
"""
import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import char_tokenizer  # noqa: E402

from efx import distributed  # noqa: E402
from efx.method.prune import PruneConfig  # noqa: E402
from efx.method.schedule import EfficientXpertCallback  # noqa: E402
from efx.model.loading import load_model  # noqa: E402
from efx.recipes import unload  # noqa: E402
from efx.training import LoraSettings, TrainSettings, train_lora  # noqa: E402

WORDS = ["alpha", "gamma", "delta", "omega", "sigma", "kappa", "theta", "iotas"]  # equal lengths: equal
# completion tokens on every rank, so the mean of the ranks' losses is the loss of the whole batch


class BadShard(TrainerCallback):
    """Before the final call: a NaN in rank 1's shard of one weight, which rank 0 cannot see."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if distributed.rank() == 1:
            with torch.no_grad():
                model.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight.to_local()[0, 0] = float("nan")


def main(model_dir: str, out_dir: str, mode: str = "") -> None:
    world = distributed.world_size()
    model, _ = load_model(model_dir, fsdp=world > 1)
    examples = [{"prompt": f"say {w}", "completion": w} for w in WORDS] * 2
    callback = EfficientXpertCallback(None, PruneConfig(sparsity=0.5), statistics="training")
    extra = {"train_sampling_strategy": "sequential", **({"ddp_backend": "gloo"} if world > 1 else {})}
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=8 // world, learning_rate=1e-2, extra_args=extra)
    callbacks = [BadShard(), callback] if mode == "nan" else [callback]
    model, _ = train_lora(model, char_tokenizer(), examples, lora=LoraSettings(dropout=0.0), training=settings,
                          callbacks=callbacks)
    model = unload(model)
    state = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
             for name, t in model.state_dict().items()}
    if distributed.is_main():
        torch.save({"state": state, "calls": [c["when"] for c in callback.reports], "world": world},
                   os.path.join(out_dir, f"world{world}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
