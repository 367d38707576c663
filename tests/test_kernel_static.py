"""The static cost check: kernels compiled for an H200 (sm_90) on this machine, without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from efx_kernels.dispatch import triton_available

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "kernel_static.py"


def load_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("kernel_static", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_static"] = module  # its dataclasses resolve their module there
    spec.loader.exec_module(module)
    return module


def without_interpreter(args: list, timeout: int) -> None:
    """Python with `args` in a process without TRITON_INTERPRET (kernels compile for a GPU there);
    a non-zero exit fails the test with the process's output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_every_kernel_compiles_for_sm90_and_kept_configs_neither_spill_nor_overflow(tmp_path):
    """A subset (bf16, r 16, the largest kept tile per kernel, format and token count): a compile
    error, a spill or shared memory over 227 KB in a kept config makes the check exit 1."""
    out = tmp_path / "static.json"
    without_interpreter([str(SCRIPT), "--arch", "sm_90", "--subset", "--output", str(out)], timeout=600)
    records = json.loads(out.read_text())["records"]
    kernels = {r["kernel"] for r in records}
    assert kernels == {"forward", "grad_input", "act_sq", "foresight_score", "foresight_nm_keep_mask", "pbs_rhs",
                       "pbs_row_solve"}
    assert {r["format"] for r in records if r["kernel"] == "forward"} == {"masked", "2:4", "bitmap"}
    for r in records:
        assert "error" not in r and r["regs"] > 0 and r["spill_bytes"] == 0 and r["smem_ok"], r
        assert r["instructions_per_weight"] > 0
    assert all(r["tensor_core"] for r in records if r["kernel"] in ("forward", "grad_input"))
    # the 2:4 forward decodes two groups per table read and four prmt: at most twice the instructions
    # per weight of the dense-with-zeros format at the same tile (one 8-byte entry per group took 2.8x
    # at the 16 x 128 decode tile; one masked load per element 8-10x)
    per_weight = {(r["format"], r["tokens"], r["config"]["BLOCK_M"], r["config"]["BLOCK_ROWS"]):
                  r["instructions_per_weight"] for r in records if r["kernel"] == "forward"}
    for (fmt, tokens, bm, br), cost in per_weight.items():
        if fmt == "2:4":
            assert cost <= 2 * per_weight["masked", tokens, bm, br], (tokens, bm, br)


def run_compiler(code: str) -> None:
    """`code` with the static check importable as `static`; it fails by raising."""
    prelude = f"import sys\nsys.path.insert(0, {str(SCRIPT.parent)!r})\nimport kernel_static as static\n"
    without_interpreter(["-c", prelude + code], timeout=300)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_a_warm_cache_answers_without_the_tools():
    """The second compile of a case reads ptxas' and nvdisasm's findings from Triton's cache."""
    run_compiler("""
case = static.pruning_cases(["bfloat16"], [16], subset=True)[0]
first = static.compile_case(case, "sm_90")
assert "error" not in first and first["regs"] > 0, first

def no_tools(*args, **kwargs):
    raise AssertionError(f"ran {args[0][0]} for a cached kernel")

static.subprocess.run = no_tools
again = static.compile_case(case, "sm_90")
drop = lambda record: {k: v for k, v in record.items() if k != "compile_seconds"}
assert drop(again) == drop(first), (again, first)
""")


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_the_configs_that_once_spilled_do_not():
    """Kept configs outside the suite's subset that spilled: the bitmap forward without LoRA at
    16 x 64 tiles on sm_90 (8 bytes: the row offset carried across the main loop) and the fused
    PBS row solve at r 64 in fp32 on sm_80 (516 bytes: 64-column steps)."""
    run_compiler("""
forward = [c for c in static.matmul_cases(["bfloat16"], [0], subset=False) if c.kernel == "forward"
           and c.format == "bitmap" and c.kept and c.tokens == 16 and c.config["BLOCK_ROWS"] == 64]
solve = [c for c in static.pruning_cases(["float32"], [64], subset=False) if c.kernel == "pbs_row_solve"]
assert len(forward) == 1 and len(solve) == 1
for case, arch in ((forward[0], "sm_90"), (solve[0], "sm_80")):
    record = static.compile_case(case, arch)
    assert "error" not in record and record["spill_bytes"] == 0, record
""")


def test_main_loop_is_the_largest_backward_branch():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   FFMA R3, R2, R2, R3 ;
        /*0030*/              @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/                   FFMA R3, R2, R2, R3 ;
        /*0060*/                   IADD3 R4, R4, 0x4, RZ ;
        /*0070*/                   ISETP.GE.AND P0, PT, R4, R5, PT ;
        /*0080*/              @!P0 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
"""
    static = load_script()
    assert static.main_loop_instructions(sass) == 5
    assert static.count_instructions(sass) == 10
