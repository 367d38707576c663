"""FSDP2: two gloo processes shard a tiny model as it loads, train LoRA with EfficientXpert's
calls (each gathering one block at a time) and end with the masks and weights of one process
trained on the same data; a bad shard on one rank fails every rank with the same message; and
`efx run --fsdp` under torchrun writes one exactly sparse expert and a report of the launch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, tiny_model

pytestmark = pytest.mark.ddp
HERE = os.path.dirname(__file__)
ENV = dict(os.environ, OMP_NUM_THREADS="1", EFX_KERNELS="torch")


def torchrun(args, port, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp") / "model"
    tiny_model("llama", vocab_size=256).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_two_sharded_processes_prune_as_one_process_on_the_same_data(model_dir, tmp_path):
    worker = os.path.join(HERE, "fsdp_worker.py")
    single = subprocess.run([sys.executable, worker, str(model_dir), str(tmp_path)], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun([worker, str(model_dir), str(tmp_path)], 29521)
    one, two = (torch.load(tmp_path / f"world{w}.pt") for w in (1, 2))
    assert two["world"] == 2 and one["calls"] == two["calls"] == ["epoch 2 start", "epoch 3 start", "train end"]
    targets = [name for name in one["state"] if name.endswith("proj.weight")]
    assert len(targets) == 14
    for name in targets:
        mask = one["state"][name] == 0
        assert torch.equal(mask, two["state"][name] == 0), name  # the same weights pruned
        assert int(mask.sum()) == mask.numel() // 2, name
    for name, tensor in one["state"].items():  # and the same weights, up to the order of float sums
        torch.testing.assert_close(two["state"][name], tensor, rtol=0, atol=1e-5)


def test_a_bad_shard_on_one_rank_fails_every_rank_with_the_same_message(model_dir, tmp_path):
    done = torchrun([os.path.join(HERE, "fsdp_worker.py"), str(model_dir), str(tmp_path), "nan"], 29523, check=False)
    assert done.returncode != 0
    message = "model.layers.1.mlp.down_proj.weight holds NaN or Inf"
    assert f"[rank0]: ValueError: {message}" in done.stderr and f"[rank1]: ValueError: {message}" in done.stderr
    assert not (tmp_path / "world2.pt").exists()


def test_efx_run_fsdp_writes_one_sparse_expert_and_reports_the_launch(tmp_path):
    from test_cli import tiny_setup
    tmp_path, args = tiny_setup.__wrapped__(tmp_path)
    out = tmp_path / "out"
    efx = [os.path.join(os.path.dirname(sys.executable), "efx"), *args, "--batch-size", "2", "--fsdp",
           "--keep-adapter", "--output", str(out)]
    done = torchrun(efx, 29525)
    assert done.stdout.count("overall retention") == 1  # rank 0 alone prints and writes
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["strategy"] == "fsdp2"
    assert len(report["distributed"]["peak_rss_mb_per_rank"]) == 2
    assert report["sparsity"]["overall"] == pytest.approx(0.5) and report["sparsity"]["counted_in"] == "saved files"
    config = json.loads((out / "expert" / "config.json").read_text())
    assert "distributed_config" not in config and "sparsity_config" not in config
    assert (out / "expert" / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    from efx.model.adapter import load_adapter
    from transformers import AutoModelForCausalLM
    expert = load_adapter(AutoModelForCausalLM.from_pretrained(out / "expert"), out / "expert" / "adapter")
    with torch.no_grad():
        assert torch.isfinite(expert(torch.tensor([[5, 6, 7]])).logits).all()
    # without a distributed launch --fsdp is refused before any work
    from efx.cli.main import main
    assert main(efx[1:-1] + [str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()
