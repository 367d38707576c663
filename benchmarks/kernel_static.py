"""Static cost check of every Triton kernel of efx_kernels, compiled ahead of time for a GPU that
this machine need not have (`triton.compile` with a `GPUTarget`, the ptxas of the triton wheel).

    python benchmarks/kernel_static.py --arch sm_90 --output benchmarks/results/kernel_static_sm90.json
        [--subset]   # a few cases per kernel (what the test suite runs)

One record per case: kernel, arch, format (matmul only: masked, 2:4, bitmap), dtype, rank, config
(tile sizes, warps, stages), tokens (the M the launch is specialized for), kept (whether dispatch
or the autotuner would run this config for that M), regs, spill_bytes, smem_bytes, and
instructions_per_weight: the SASS instructions of the kernel's main loop per weight element it
consumes there, per thread (for kernels without a loop over weights, all instructions of the
kernel per weight element of a program, per thread). This is a proxy, not a speed: it catches
configs that spill, overflow shared memory or decode one element at a time. The launch is
specialized as a real call is: 16-aligned pointers and sizes divisible by 16 get Triton's
divisibility hint, and a size of 1 becomes a constant.

A cold run compiles every case and runs ptxas and nvdisasm on it (minutes); what it derives is kept
in Triton's cache beside each kernel, so a run with a warm cache takes seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMEM_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
MATMUL_DTYPES = ("float16", "bfloat16")  # what the fused matmul's wrapper accepts (fp32 runs torch)
RANKS = (0, 8, 16, 64)
HIDDEN, INTERMEDIATE = 4096, 14336  # Llama-3-8B: the shapes of gate/up (out 14336, in 4096)
TOKENS = {"decode": (1, 16), "prefill": (2048,)}


@dataclass
class Case:
    kernel: str
    dtype: str
    rank: int
    config: dict
    tokens: int | None = None
    format: str | None = None
    kept: bool = True
    weights_per_iteration: int = 0  # weight elements one main-loop iteration consumes, per program
    whole_kernel: bool = False      # no loop over weights: count every instruction
    args: dict = field(default_factory=dict, repr=False)
    constexprs: dict = field(default_factory=dict, repr=False)
    jit: object = field(default=None, repr=False)


def _signature(jit, values: dict, constexprs: dict, pointer_types: dict):
    """Triton signature, constants and attributes of a launch with these argument values."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(values[name], float):
            signature[name] = "fp32"
        elif values[name] == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if values[name] % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def matmul_cases(dtypes, ranks, subset: bool) -> list[Case]:
    from efx_kernels import sparse_lora as sl
    from efx_kernels._triton import block_for_rank
    cases = []
    for kernel_name in ("forward", "grad_input"):
        jit = (sl._forward_kernel if kernel_name == "forward" else sl._grad_input_kernel).fn
        for fmt, fmt_id in sl.FORMAT_IDS.items():
            for dtype in [d for d in dtypes if d in MATMUL_DTYPES]:
                for rank in ranks:
                    for configs_tokens in [t for group in TOKENS.values() for t in group]:
                        bucket = sl.m_bucket(configs_tokens)
                        kept_configs = sl.prune_tile_configs(sl._tile_configs(), {"m_bucket": bucket}, FORMAT=fmt_id)
                        kept_keys = [c.kwargs for c in kept_configs]
                        for config in sl._tile_configs():
                            kept = config.kwargs in kept_keys
                            if subset and not kept:
                                continue
                            cases.append(_matmul_case(sl, jit, kernel_name, fmt, fmt_id, dtype, rank, config,
                                                      configs_tokens, kept, block_for_rank(rank)))
    if subset:  # per (kernel, format, token count) the largest kept tile: decode and prefill
        seen, chosen = set(), []
        for c in reversed(cases):
            key = (c.kernel, c.format, c.tokens)
            if key not in seen and c.dtype == dtypes[0] and c.rank == ranks[0]:
                seen.add(key)
                chosen.append(c)
        cases = chosen[::-1]
    return cases


def _matmul_case(sl, jit, kernel_name, fmt, fmt_id, dtype, rank, config, tokens, kept, block_r) -> Case:
    n_out, n_in = INTERMEDIATE, HIDDEN
    elem = "*" + DTYPES[dtype]
    # w0, w1, w2 as _weight_args passes them: 2:4 values as int64 quads, int64 position words and
    # the int32 selector table; bitmap values as int32 pairs, int64 mask words and int32 offsets
    w_types = {"bitmap": ("*i32", "*i64", "*i32"), "2:4": ("*i64", "*i32", "*i32"), "masked": (elem, elem, elem)}[fmt]
    stride0 = {"bitmap": 0, "2:4": n_in // 8, "masked": n_in}[fmt]
    stride1 = {"bitmap": n_in // 64, "2:4": n_in // 32, "masked": 0}[fmt]
    common = dict(n_tokens=tokens, n_out=n_out, n_in=n_in, rank=max(rank, 1) if rank else 0, m_bucket=sl.m_bucket(tokens),
                  stride0=stride0, stride1=stride1)
    import torch
    values_dtype = sl.TRITON_DTYPES[getattr(torch, dtype)]
    if kernel_name == "forward":
        values = dict(common, stride_y=n_out, stride_x=n_in, stride_xa=block_r, stride_b=max(rank, 1))
        pointers = {"y_ptr": elem, "x_ptr": elem, "w0_ptr": w_types[0], "w1_ptr": w_types[1], "w2_ptr": w_types[2],
                    "xa_ptr": elem, "b_ptr": elem, "bias_ptr": elem}
        constexprs = dict(FORMAT=fmt_id, HAS_LORA=rank > 0, HAS_BIAS=False, VALUES=values_dtype, EMULATE=False)
    else:
        values = dict(common, stride_dx=n_in, stride_dy=n_out, stride_dyb=block_r, stride_a=n_in)
        pointers = {"dx_ptr": elem, "dy_ptr": elem, "w0_ptr": w_types[0], "w1_ptr": w_types[1], "w2_ptr": w_types[2],
                    "dyb_ptr": elem, "a_ptr": elem}
        constexprs = dict(FORMAT=fmt_id, HAS_LORA=rank > 0, VALUES=values_dtype, EMULATE=False)
    constexprs.update(BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_ROWS=config.kwargs["BLOCK_ROWS"], BLOCK_R=block_r)
    case = Case(kernel=kernel_name, dtype=dtype, rank=rank, tokens=tokens, format=fmt, kept=kept,
                config={**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
                weights_per_iteration=config.kwargs["BLOCK_ROWS"] * 64, jit=jit, constexprs=constexprs)
    case.args = {"values": values, "pointers": pointers}
    return case


def pruning_cases(dtypes, ranks, subset: bool) -> list[Case]:
    from efx_kernels import act_stats, foresight, pbs
    from efx_kernels._triton import block_for_rank
    cases = []
    m, n = INTERMEDIATE, HIDDEN
    for dtype in dtypes:
        elem = "*" + DTYPES[dtype]
        cases.append(Case("act_sq", dtype, 0, {"BLOCK_T": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                          weights_per_iteration=32 * 128, jit=act_stats._act_sq_partial_kernel,
                          constexprs=dict(HAS_MASK=True, BLOCK_T=32, BLOCK_N=128),
                          args={"values": dict(n_tokens=4096, n_cols=n, stride_x=n, tokens_per_split=128),
                                "pointers": {"x_ptr": elem, "keep_ptr": "*i8", "part_ptr": "*fp32"}}))
        for rank in ranks:
            flags = dict(HAS_LORA=rank > 0, HAS_ROW=True, HAS_COL=False, COL_GROUPED=False, HAS_PREV=True)
            score_values = dict(n_rows=m, n_cols=n, rank=rank, scale=2.0, eta=0.5, rows_per_group=1,
                                stride_w=n, stride_a=n, stride_b=max(rank, 1), stride_colf=0, stride_prev=n)
            pointers = {"w_ptr": elem, "a_ptr": elem, "b_ptr": elem, "stat_ptr": "*fp32", "rowf_ptr": "*fp32",
                        "colf_ptr": "*fp32", "prev_ptr": "*bf16"}
            cases.append(Case("foresight_score", dtype, rank, {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4,
                                                               "num_stages": 3},
                              weights_per_iteration=32 * 128, whole_kernel=True, jit=foresight._score_kernel,
                              constexprs=dict(flags, BLOCK_M=32, BLOCK_N=128),
                              args={"values": dict(score_values, stride_out=n),
                                    "pointers": dict(pointers, out_ptr="*fp32")}))
            cases.append(Case("foresight_nm_keep_mask", dtype, rank, {"BLOCK_P": 64, "num_warps": 4, "num_stages": 3},
                              weights_per_iteration=64 * 4, whole_kernel=True, jit=foresight._nm_mask_kernel,
                              constexprs=dict(flags, KEEP_N=2, GROUP_M=4, BLOCK_P=64),
                              args={"values": dict(score_values, stride_keep=n),
                                    "pointers": dict(pointers, keep_ptr="*i8")}))
            if rank == 0:
                continue
            block_r = block_for_rank(rank)
            pbs_pointers = {"w_ptr": elem, "a_ptr": elem, "b_ptr": elem, "keep_ptr": "*i8", "g_ptr": "*fp32"}
            cases.append(Case("pbs_rhs", dtype, rank, {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                              weights_per_iteration=32 * 64, jit=pbs._pbs_rhs_kernel,
                              constexprs=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_R=block_r),
                              args={"values": dict(n_rows=m, n_cols=n, rank=rank, scale=2.0, stride_w=n, stride_a=n,
                                                   stride_b=rank, stride_keep=n, stride_out=rank),
                                    "pointers": dict(pbs_pointers, out_ptr="*fp32")}))
            if rank <= pbs.MAX_FUSED_RANK:
                solve_pointers = {"w_ptr": elem, "a_ptr": elem, "b_ptr": elem, "prune_ptr": "*i8", "g_ptr": "*fp32",
                                  "out_ptr": "*fp32"}
                columns = pbs.row_solve_columns(block_r)
                cases.append(Case("pbs_row_solve", dtype, rank, {"BLOCK_N": columns, "num_warps": 4, "num_stages": 3},
                                  weights_per_iteration=columns, jit=pbs._pbs_row_solve_kernel,
                                  constexprs=dict(BLOCK_N=columns, BLOCK_R=block_r),
                                  args={"values": dict(n_cols=n, rank=rank, scale=2.0, keep_weight=0.5, ridge=1e-8,
                                                       stride_w=n, stride_a=n, stride_b=rank, stride_prune=n,
                                                       stride_out=rank),
                                        "pointers": solve_pointers}))
    if subset:
        seen, chosen = set(), []
        for c in cases:
            if c.kernel not in seen and c.dtype == dtypes[0] and c.rank in (0, ranks[0]):
                seen.add(c.kernel)
                chosen.append(c)
        cases = chosen
    return cases


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: Case, arch: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    capability = int(arch.split("_")[1])
    signature, constants, attrs = _signature(case.jit, case.args["values"], case.constexprs, case.args["pointers"])
    record = {"kernel": case.kernel, "arch": arch, "format": case.format, "dtype": case.dtype, "rank": case.rank,
              "config": case.config, "tokens": case.tokens, "kept": case.kept}
    started = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(case.jit, signature, constants, attrs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": case.config["num_warps"],
                                           "num_stages": case.config["num_stages"]})
    except Exception as err:  # a compile error is a finding, not a crash of the check
        record.update(error=f"{type(err).__name__}: {str(err)[:300]}")
        return record
    record["compile_seconds"] = time.perf_counter() - started
    facts = binary_facts(compiled, capability)
    record["regs"], record["spill_bytes"] = facts["regs"], facts["spill_bytes"]
    record["smem_bytes"] = compiled.metadata.shared
    record["smem_ok"] = compiled.metadata.shared <= SMEM_LIMIT[arch]
    threads = 32 * case.config["num_warps"]
    loop = facts["loop_instructions"]
    instructions = facts["instructions"] if case.whole_kernel or loop is None else loop
    record["loop_instructions"] = loop
    record["instructions_per_weight"] = instructions / (case.weights_per_iteration / threads)
    record["tensor_core"] = facts["tensor_core"]
    return record


FACTS = "efx_static_v1.json"  # rename when binary_facts derives something new


def binary_facts(compiled, capability: int) -> dict:
    """Registers and spills (`ptxas -v` on the kernel's PTX) and SASS counts (`nvdisasm` of its
    cubin) of a compiled kernel. Stored in Triton's cache under the kernel's hash, so a run whose
    kernels are all cached reads them instead of running the tools (seconds, not minutes)."""
    from triton.runtime.cache import get_cache_manager
    cache = get_cache_manager(compiled.hash)
    stored = cache.get_file(FACTS)
    if stored:
        return json.loads(Path(stored).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = Path(tmp) / "k.cubin", Path(tmp) / "k.ptx"
        cubin.write_bytes(compiled.asm["cubin"])
        ptx.write_text(compiled.asm["ptx"])
        ptxas = _tool("ptxas-blackwell" if capability >= 90 else "ptxas")
        gpu = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        usage = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(ptx), "-o", str(Path(tmp) / "v.cubin")],
                               capture_output=True, text=True).stderr
        sass = subprocess.run([_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", usage)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", usage)
    facts = {"regs": int(regs.group(1)) if regs else None,
             "spill_bytes": max(int(spills.group(1)), int(spills.group(2))) if spills else None,
             "loop_instructions": main_loop_instructions(sass), "instructions": count_instructions(sass),
             "tensor_core": bool(re.search(r"\b(HGMMA|HMMA|IMMA)\b", sass))}
    if facts["regs"] is not None and sass:  # a tool that failed leaves nothing to reuse
        cache.put(json.dumps(facts), FACTS, binary=False)
    return facts


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*")


def count_instructions(sass: str) -> int:
    return sum(1 for line in sass.splitlines() if _INSTRUCTION.match(line))


def main_loop_instructions(sass: str) -> int | None:
    """Instructions of the largest loop: from a label to the last backward branch that jumps to it."""
    lines = sass.splitlines()
    labels, best = {}, None
    count = 0
    for line in lines:
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
            continue
        if _INSTRUCTION.match(line):
            count += 1
            branch = re.search(r"\bBRA\b.*`\(\.(L_x_\d+)\)", line)
            if branch and branch.group(1) in labels:
                size = count - labels[branch.group(1)]
                best = size if best is None or size > best else best
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", choices=sorted(SMEM_LIMIT))
    parser.add_argument("--output", default=None, help="JSON file, or a folder for kernel_static_ARCH.json "
                                                       "(default: benchmarks/results/)")
    parser.add_argument("--subset", action="store_true", help="one case per kernel and tile family (seconds)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=list(RANKS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)
    dtypes = args.dtypes if not args.subset else ["bfloat16"]
    ranks = tuple(args.ranks) if not args.subset else (16,)
    cases = matmul_cases(dtypes, ranks, args.subset) + pruning_cases(dtypes, ranks, args.subset)
    output = Path(args.output or ROOT / "benchmarks" / "results")
    if output.suffix != ".json":
        output = output / f"kernel_static_{args.arch.replace('_', '')}.json"
    from efx.io import atomic_write_text
    import triton
    result = {"benchmark": "kernel_static", "arch": args.arch, "triton": triton.__version__,
              "command": "python benchmarks/kernel_static.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "shape": [INTERMEDIATE, HIDDEN], "records": []}
    for index, case in enumerate(cases):
        result["records"].append(compile_case(case, args.arch))
        if index % 20 == 19 or index == len(cases) - 1:
            atomic_write_text(output, json.dumps(result, indent=1))
    bad = [r for r in result["records"] if r.get("kept") and (r.get("error") or r.get("spill_bytes") or
                                                               not r.get("smem_ok", True))]
    for r in bad:
        print(f"kept config fails: {r['kernel']} {r.get('format')} {r['dtype']} r{r['rank']} {r['config']} "
              f"M={r.get('tokens')}: {r.get('error') or ''} spill {r.get('spill_bytes')} smem {r.get('smem_bytes')}")
    print(f"{len(result['records'])} cases, {len(bad)} kept configs that spill, overflow shared memory or fail; "
          f"written to {output}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
