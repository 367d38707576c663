"""Scale: pruning calls and a whole `efx run` on Llama-family decoders of real layer shapes, built
at run time with random weights (no model is downloaded).

    python benchmarks/scale.py [--device cpu|cuda] [--dtype bfloat16] [--output benchmarks/results]
        [--cases call:llama3-8b:1 call:llama3-8b:2 call:narrow:2 ... run:llama3-8b:2]

Each case runs in a process of its own, so that its peaks are its own:
- `call:SHAPE:L`: one EfficientXpert pruning call (ForeSight + PBS, 40%, calibration pass) on an L-layer
  model with a LoRA adapter of rank 16; its time and its extra peak memory over what the process
  held before it (peak RSS and peak bytes in use on a CPU, torch's peak allocated on a GPU), beside
  the bytes of the targets of one layer and of all L layers.
- `run:SHAPE:L`: `efx run` (dense LoRA reference, the expert with its pruning calls, both
  evaluated, the expert saved) on a small user JSONL domain; peak memory per stage against the
  model's bytes.
From these rows it extrapolates a 32-layer Llama-3-8B (see docs/memory.md for the plan) and writes
everything to scale_<device>.json, row by row as the cases finish.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128),
    "narrow": dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=4,
                   head_dim=64),
}
LLAMA3_8B = dict(layers=32, vocab=128256)
CPU_CASES = ["call:narrow:2", "call:narrow:6", "call:narrow:12", "call:llama3-8b:1", "call:llama3-8b:2",
             "run:llama3-8b:2"]
VOCAB = 256  # the character tokenizer's ids fit; embedding and head are not what is measured
CALIB = (8, 128)  # calibration sequences x tokens of a call case


def build(shape: str, layers: int, dtype, device):
    import torch
    import transformers
    config = transformers.LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=VOCAB,
                                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def target_bytes(model) -> tuple[int, int]:
    """Bytes of the target weights of one block and of all blocks."""
    from efx.model.arch import architecture_map, base_linear
    arch = architecture_map(model)
    per_block = [sum(base_linear(m).weight.nbytes for m in b.targets.values()) for b in arch.blocks]
    return per_block[0], sum(per_block)


def peak_of(record: dict, before: dict) -> dict:
    out = {"extra_peak_rss_mb": record["peak_rss_mb"] - before["rss_mb"]}
    if record.get("peak_heap_in_use_mb") is not None and before.get("heap_mb") is not None:
        out["extra_peak_heap_in_use_mb"] = record["peak_heap_in_use_mb"] - before["heap_mb"]
    if record.get("peak_cuda_mb") is not None:
        out["extra_peak_cuda_mb"] = record["peak_cuda_mb"] - before["cuda_mb"]
    return out


def held_now() -> dict:
    import gc

    import torch
    from efx.measure import heap_in_use_bytes, rss_bytes
    gc.collect()
    heap = heap_in_use_bytes()
    return {"rss_mb": rss_bytes() / 2**20, "heap_mb": None if heap is None else heap / 2**20,
            "cuda_mb": torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None}


def call_case(shape: str, layers: int, dtype, device) -> dict:
    import torch
    from efx.measure import measure
    from efx.method.prune import PruneConfig, prune
    from efx.training import LoraSettings, add_lora
    model = add_lora(build(shape, layers, dtype, device), LoraSettings(r=16))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3)
    layer_bytes, all_bytes = target_bytes(model)
    calib = torch.randint(0, VOCAB, CALIB, generator=gen)
    before = held_now()
    record: dict = {}
    with tempfile.TemporaryDirectory(prefix="efx-scale-") as work, measure(record, "call"):
        # the heaviest call of efx run's default: merge, mask, and the kept weights rebuilt from E[x x^T]
        prune(model, calib, PruneConfig(sparsity=0.4, reconstruct=True), work_dir=work)
    return {"case": f"call:{shape}:{layers}", "shape": shape, "layers": layers, "layer_target_mb": layer_bytes / 2**20,
            "target_mb": all_bytes / 2**20, "call_seconds": record["call"]["seconds"], "held_before_mb": before,
            **peak_of(record["call"], before)}


def write_domain(folder: Path) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows = [{"prompt": f"Which word follows {a}?", "completion": b} for a, b in zip(words, words[1:] + words[:1])]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows * 2))
    quiz = [{"prompt": f"Which word follows {a}?", "choices": [b, a, "none", "all"], "answer": 0}
            for a, b in zip(words, words[1:] + words[:1])]
    (folder / "quiz.jsonl").write_text("\n".join(json.dumps(r) for r in quiz))
    (folder / "ppl.jsonl").write_text("\n".join(json.dumps({"text": " ".join(words[i:] + words[:i])})
                                                for i in range(4)))


def run_case(shape: str, layers: int, dtype, device) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer
    from efx.cli.run import RunSettings, run
    with tempfile.TemporaryDirectory(prefix="efx-scale-run-") as tmp:
        tmp = Path(tmp)
        model = build(shape, layers, dtype, "cpu")  # saved in the dtype it runs in, as released checkpoints are
        model.save_pretrained(tmp / "model")
        char_tokenizer().save_pretrained(tmp / "model")
        model_bytes = sum(p.nbytes for p in model.parameters())
        layer_bytes, all_bytes = target_bytes(model)
        del model
        (tmp / "domain").mkdir()
        write_domain(tmp / "domain")
        settings = RunSettings(model=str(tmp / "model"), domain=str(tmp / "domain"), dtype=str(dtype).split(".")[1],
                               device=device, epochs=2, n_examples=8, batch_size=2, calib=4, max_length=64,
                               eval_items=8, work_dir=str(tmp / "work"))
        before = held_now()
        started = time.perf_counter()
        report = run(settings, tmp / "out")
        wall = time.perf_counter() - started
    stages = {k: {key: v.get(key) for key in ("seconds", "peak_rss_mb", "peak_heap_in_use_mb", "peak_cuda_mb")}
              for k, v in report["measure"].items()}
    peak_key = "peak_cuda_mb" if device != "cpu" else "peak_rss_mb"
    peak = max(v[peak_key] for v in stages.values()) - (before["cuda_mb"] if device != "cpu" else before["rss_mb"])
    return {"case": f"run:{shape}:{layers}", "shape": shape, "layers": layers, "model_mb": model_bytes / 2**20,
            "layer_target_mb": layer_bytes / 2**20, "target_mb": all_bytes / 2**20, "wall_seconds": wall,
            "stages": stages, "held_before_mb": before, "peak_mb": peak, "peak_kind": f"{peak_key} over the process before", "peak_over_model": peak / (model_bytes / 2**20),
            "reconstruct": report["reconstruct"],
            "sparsity": report["sparsity"]["overall"], "negative_zeros": report["sparsity"]["negative_zeros"],
            "saved_dtypes": sorted({m["dtype"] for m in report["sparsity"]["modules"].values()})}


def one_case(case: str, dtype_name: str, device: str) -> dict:
    import torch
    kind, shape, layers = case.split(":")
    dtype = getattr(torch, dtype_name)
    return (call_case if kind == "call" else run_case)(shape, int(layers), dtype, device)


def extrapolate(rows: list[dict]) -> dict:
    """A 32-layer Llama-3-8B from the measured rows: a call's extra memory per added layer (as a
    fraction of one layer's target bytes) on the narrow model, the 8B call's extra peak, and the
    plan of docs/memory.md for a whole run on one GPU."""
    out: dict = {}
    narrow = {r["layers"]: r for r in rows if r["case"].startswith("call:narrow")}
    if 2 in narrow and 6 in narrow:
        a, b = narrow[2], narrow[6]
        out["growth_2_to_6_per_layer_over_layer_bytes"] = {
            key: (b[key] - a[key]) / 4 / a["layer_target_mb"]
            for key in ("extra_peak_rss_mb", "extra_peak_heap_in_use_mb", "extra_peak_cuda_mb") if key in a}
    key = "extra_peak_cuda_mb" if any("extra_peak_cuda_mb" in r for r in rows) else "extra_peak_rss_mb"
    calls_8b = [r for r in rows if r["case"].startswith("call:llama3-8b")]
    if calls_8b:
        out["call_extra_mb_8b"] = max(r[key] for r in calls_8b)
        out["call_seconds_per_layer_8b"] = max(r["call_seconds"] / r["layers"] for r in calls_8b)
    out["plan_gb"] = memory_plan(call_extra_mb=out.get("call_extra_mb_8b"))
    return out


def memory_plan(call_extra_mb: float | None = None, tokens: int = 8 * 128, rank: int = 8) -> dict:
    """docs/memory.md's plan of an 8B `efx run` in bf16 on one GPU, in GB: the model, LoRA in fp32
    with its gradient and Adam's two moments, the activations of one step (no checkpointing) and
    the largest of a pruning call's ForeSight workspace, its rebuild workspace and the measured
    extra peak of a call."""
    h, i, kv, layers, vocab = 4096, 14336, 1024, LLAMA3_8B["layers"], LLAMA3_8B["vocab"]
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * vocab * h + h
    lora = layers * rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    # per layer and token, bf16: the inputs of q/k/v, o, gate/up and down, the attention output,
    # the MLP's gate, up and product, the two norms (about 10 h + 4 i values)
    activations = layers * tokens * (10 * h + 4 * i) * 2
    workspace = 3 * 4 * i * h  # one MLP target: U and the score in fp32, the previous score in bf16 + the mask
    # efx run's default rebuilds the kept weights: a block's E[x x^T] (q/k/v, o, gate/up: h x h; down: i x i, fp32)
    # and, for down, SparseGPT's factorization (a fp32 copy, two fp64 i x i alive at once, the fp32 weight)
    rebuild = 4 * (3 * h * h + i * i) + 4 * i * i + 2 * 8 * i * i + 4 * h * i
    plan = {"model": params * 2 / 1e9, "lora_fp32_with_grad_and_adam": lora * 16 / 1e9,
            "activations": activations / 1e9,
            "call_workspace": max(workspace, rebuild, (call_extra_mb or 0) * 2**20) / 1e9}
    plan["total"] = sum(plan.values())
    return plan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--cases", nargs="+", default=None, help=f"default on a CPU: {' '.join(CPU_CASES)}")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a case in this process, JSON on stdout
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.one:
        print("EFX-ROW " + json.dumps(one_case(args.one, args.dtype, args.device)))
        return 0
    from efx.evaluation.report import versions
    from efx.io import atomic_write_text
    cases = args.cases or (CPU_CASES if args.device == "cpu" else
                           ["call:narrow:2", "call:narrow:6", "call:llama3-8b:2", "call:llama3-8b:32",
                            "run:llama3-8b:32"])
    path = Path(args.output) / f"scale_{args.device}.json"
    result = {"benchmark": "scale", "device": args.device, "dtype": args.dtype, "calibration": list(CALIB),
              "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "versions": versions(), "rows": []}
    for case in cases:
        done = subprocess.run([sys.executable, __file__, "--one", case, "--dtype", args.dtype, "--device", args.device],
                              capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("EFX-ROW ")), None)
        row = json.loads(line[len("EFX-ROW "):]) if done.returncode == 0 and line else \
            {"case": case, "error": done.stderr[-2000:]}
        result["rows"].append(row)
        result["extrapolation"] = extrapolate([r for r in result["rows"] if "error" not in r])
        atomic_write_text(path, json.dumps(result, indent=2))
        print(json.dumps(row)[:400], flush=True)
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
