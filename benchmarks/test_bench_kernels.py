"""pytest-benchmark entry points (`pytest benchmarks/test_bench_kernels.py`): the sparse+LoRA
matmul against dense + unfused LoRA on the embedded model's shapes, and batched PBS. On a CPU
these time the torch paths; on a GPU the Triton kernels. Speed claims come from
kernel_bench.py's JSON, which puts both sides of each ratio in the same run."""
import pytest
import torch

import efx_kernels
from efx.method.pbs import partial_brain_surgeon

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def operands(m, n, tokens, r=16, sparsity=0.5):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=gen).to(DEVICE, DTYPE)
    keep = (torch.rand(m, n, generator=gen) >= sparsity).to(DEVICE)
    x = torch.randn(tokens, n, generator=gen).to(DEVICE, DTYPE)
    A = (torch.randn(r, n, generator=gen) * 0.01).to(DEVICE, DTYPE)
    B = (torch.randn(m, r, generator=gen) * 0.01).to(DEVICE, DTYPE)
    return W, keep, x, A, B


@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536)])
def test_dense_plus_unfused_lora(benchmark, shape, tokens):
    W, keep, x, A, B = operands(*shape, tokens)
    benchmark(lambda: torch.nn.functional.linear(x, W * keep) + 2.0 * ((x @ A.T) @ B.T))


@pytest.mark.parametrize("fmt", ["bitmap", "2:4"])
@pytest.mark.parametrize("tokens", [1, 16, 256])
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536)])
def test_sparse_lora_linear(benchmark, shape, tokens, fmt):
    W, keep, x, A, B = operands(*shape, tokens)
    if fmt == "2:4":
        order = torch.rand(shape[0], shape[1] // 4, 4).argsort(-1)[..., :2]
        keep = torch.zeros(shape[0], shape[1] // 4, 4, dtype=torch.bool).scatter_(-1, order, True)
        keep = keep.reshape(shape).to(DEVICE)
    packed = efx_kernels.pack(W * keep, keep, fmt)
    benchmark(lambda: efx_kernels.sparse_lora_linear(x, packed, A, B, 2.0))


@pytest.mark.parametrize("keep_weight", [1.0, 0.5])
def test_batched_pbs(benchmark, keep_weight):
    W, keep, _, A, B = operands(1536, 576, 1, r=8)
    g = torch.rand(576, device=DEVICE) + 0.1
    benchmark(lambda: partial_brain_surgeon(W.float(), A.float(), B.float(), keep, g, scale=2.0,
                                            keep_weight=keep_weight))
