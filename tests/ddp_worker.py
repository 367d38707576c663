"""Run by tests/test_callback.py under `torchrun --nproc_per_node=2` (gloo, CPU): LoRA training
of a tiny model with the EfficientXpert callback; each rank writes a digest of its final
weights and the statistics it pruned with."""
import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import char_tokenizer, tiny_model  # noqa: E402

from efx.method.schedule import EfficientXpertCallback  # noqa: E402
from efx.recipes import calibration_batches, unload  # noqa: E402
from efx.method.prune import PruneConfig  # noqa: E402
from efx.training import TrainSettings, train_lora  # noqa: E402


def main(out_dir: str, statistics: str) -> None:
    rank = int(os.environ["RANK"])
    tok = char_tokenizer()
    model = tiny_model("llama", vocab_size=256)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    examples = [{"prompt": f"say {w}", "completion": w} for w in words] * 2
    # each rank calibrates (or, with statistics "training", trains) on its own shard: only the
    # all-reduce makes their masks agree
    calib = calibration_batches(tok, examples[rank::2], n=4, seed=rank)
    callback = EfficientXpertCallback(calib, PruneConfig(sparsity=0.5), statistics=statistics)
    settings = TrainSettings(epochs=3, n_examples=0, batch_size=4, learning_rate=1e-2,
                             extra_args={"ddp_backend": "gloo"})
    model, _ = train_lora(model, tok, examples, training=settings, callbacks=[callback])
    model = unload(model)
    digest = hashlib.sha256()
    zeros = 0
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().numpy().tobytes())
        if "proj" in name:
            zeros += int((p == 0).sum())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump({"digest": digest.hexdigest(), "zeros": zeros, "calls": len(callback.reports),
                   "world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1},
                  handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
