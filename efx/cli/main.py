"""The `efx` command: run, eval, export, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

def _run_parser(sub) -> argparse.ArgumentParser:
    from efx.cli.run import RunSettings
    p = sub.add_parser("run", help="general model -> verified sparse expert (with a dense LoRA reference)",
                       description="Train the dense LoRA reference and the sparse expert on the same budget and "
                                   "seed, evaluate both, and write the expert, report.json, report.md and plots.")
    p.add_argument("--config", help="JSON or YAML file holding any of the settings below (flags override it)")
    p.add_argument("--output", default="runs/expert", help="output folder (default: runs/expert)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--resume", action="store_true", help="continue a run in its output folder from its last stage")
    p.add_argument("--quick", action="store_true", help="a small budget that finishes in about 3 minutes on 2 CPUs")
    docs = _field_docs(RunSettings)
    for f in fields(RunSettings):
        if f.name == "quick":  # --quick above
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=docs.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if f.name == "eval_items":
            kind = int
        p.add_argument(flag, type=kind, default=None, help=f"{docs.get(f.name, '')} (default: {f.default})")
    return p


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source."""
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(cls))
    docs, last = {}, None
    for node in tree.body[0].body:
        if isinstance(node, ast.AnnAssign):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) and last:
            docs[last] = str(node.value.value).strip()
            last = None
    return docs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efx", description="Sparse, domain-adapted experts from one LoRA run.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    e = sub.add_parser("eval", help="evaluate a saved expert or any model on a suite")
    e.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded model)")
    e.add_argument("--domain", default="medical", help="medical, legal or a path to user data")
    e.add_argument("--template", default=None, help="record template of user data: pubmedqa, mednli, casehold, "
                                                    "contractnli")
    e.add_argument("--eval-items", type=int, default=None, help="first N items of each task")
    e.add_argument("--output", default=None, help="write the result as JSON here")
    e.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the dtype the model was "
                                                 "saved in; float32 for GGUF and the embedded model)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    e.add_argument("--adapter", default=None, help="a peft adapter folder to evaluate unmerged on top of --model "
                                                   "(default: MODEL/adapter when there is one)")
    x = sub.add_parser("export", help="export a saved expert: dense-with-zeros HF folder and packed checkpoint")
    x.add_argument("--model", required=True, help="the expert's Hugging Face folder")
    x.add_argument("--output", required=True, help="folder to write")
    x.add_argument("--format", default="auto", help="packed format: auto (2:4 where every target weight's zeros "
                   "allow it, else bitmap), bitmap, 2:4 or masked (default: auto)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    x.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the dtype the expert was "
                                                 "saved in)")
    x.add_argument("--adapter", default=None, help="a peft adapter folder to export unmerged beside the sparse base "
                                                   "(default: MODEL/adapter when the expert has one, as "
                                                   "efx run --keep-adapter saves it)")
    s = sub.add_parser("suite", help="a suite's test tasks for other tools")
    s_sub = s.add_subparsers(dest="suite_command", required=True)
    se = s_sub.add_parser("export", help="the test tasks as JSONL plus lm-eval task files "
                                         "(lm_eval --include_path OUTPUT --tasks efx_DOMAIN_TASK)")
    se.add_argument("--domain", default="medical", help="medical, legal or a path to user data")
    se.add_argument("--template", default=None, help="record template of user data (as for efx eval)")
    se.add_argument("--model", default=None, help="the model whose chat template formats the contexts (default: "
                                                  "the embedded model); export with the tokenizer you evaluate")
    se.add_argument("--eval-items", type=int, default=None, help="first N items of each task")
    se.add_argument("--output", required=True, help="folder to write")
    se.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c = sub.add_parser("compare", help="several efx run folders of one domain side by side, with retention vs "
                                       "sparsity per method",
                       description="Read report.json of every RUN folder and write compare.md, compare.json and, "
                                   "for methods run at two or more sparsities, retention_vs_sparsity.png.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="efx run output folders (same domain)")
    c.add_argument("--output", required=True, help="folder for the comparison")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    b = sub.add_parser("bench", help="run the benchmarks and write JSON (and the retention table) into --output")
    b.add_argument("--output", default="benchmarks/results", help="folder for the results")
    b.add_argument("--only", nargs="+", default=None,
                   help="some of: pbs (seconds), kernels (minutes), static (the kernels compiled for sm_90 "
                        "without a GPU: registers, spills, shared memory, SASS; about 40 minutes cold, seconds "
                        "warm), overhead (about 15 minutes on 2 CPU cores), scale (about 15 minutes and 10 GB of "
                        "RAM), retention (hours on a CPU; resumes where it stopped). Default: all six, in that order")
    return parser


def _settings_from(args):
    from efx.cli.run import RunSettings, load_settings
    values = load_settings(args.config) if args.config else {}
    for f in fields(RunSettings):
        value = getattr(args, f.name, None) if f.name != "quick" else None
        if value is not None:
            values[f.name] = value
    return RunSettings.quick_run(**values) if args.quick or values.get("quick") else RunSettings(**values)


def main(argv=None) -> int:
    from efx.model.loading import ModelLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            from efx.cli.run import run
            settings = _settings_from(args)
            settings.validate()
            report = run(settings, args.output, overwrite=args.overwrite, resume=args.resume)
            from efx import distributed
            if distributed.is_main():
                print(Path(args.output, "report.md").read_text())
                print(summary_line(report))
        elif args.command == "eval":
            from efx import evaluate, load_model, load_suite
            from efx.io import atomic_write_text
            from efx.model.adapter import adapter_folder, load_adapter
            model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
            adapter = args.adapter or (adapter_folder(args.model) if args.model else None)
            if adapter is not None:
                logging.getLogger("efx").info("evaluating with the unmerged adapter %s", adapter)
                model = load_adapter(model, adapter)
            suite = load_suite(args.domain, template=args.template) if args.template else load_suite(args.domain)
            result = evaluate(model, tokenizer, suite, max_items=args.eval_items)
            text = json.dumps(result, indent=2)
            if args.output:
                atomic_write_text(args.output, text)
            print(text)
        elif args.command == "export":
            from efx.cli.export import export
            audit = export(args.model, args.output, fmt=args.format, overwrite=args.overwrite, dtype=args.dtype,
                           adapter=args.adapter)
            print(f"exported to {args.output}: sparsity {audit['overall']:.4f} counted in the written files, "
                  f"{audit['negative_zeros']} negative zeros")
        elif args.command == "suite":
            from efx import load_suite
            from efx.evaluation.harness import export_suite
            from efx.model.loading import load_tokenizer
            suite = load_suite(args.domain, template=args.template) if args.template else load_suite(args.domain)
            names = export_suite(suite, load_tokenizer(args.model), args.output, max_items=args.eval_items,
                                 overwrite=args.overwrite)
            print(f"wrote {len(names)} lm-eval tasks to {args.output}: lm_eval --model hf --model_args "
                  f"pretrained=MODEL --include_path {args.output} --tasks {','.join(names)}")
        elif args.command == "compare":
            from efx.evaluation.compare import compare
            result = compare(args.runs, args.output, overwrite=args.overwrite)
            print(Path(args.output, "compare.md").read_text())
            if not result["plotted"]:
                print("no method was run at two or more unstructured sparsities: no retention_vs_sparsity.png")
        elif args.command == "bench":
            return _bench(args)
    except (ValueError, FileExistsError, FileNotFoundError, ModelLoadError) as err:
        print(f"efx {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


def summary_line(report: dict) -> str:
    """The run's last line: retention, audited sparsity, wall time, and what the figures do not mean."""
    ret = report["retention"]
    line = (f"overall retention {ret['overall']:.3f}, sparsity {report['sparsity']['overall']:.4f}, "
            f"wall {report['wall_seconds']:.0f} s")
    if ret.get("not_meaningful"):
        line += (f"; not meaningful (dense LoRA does not beat the majority baseline), left out of the overall: "
                 f"{', '.join(ret['not_meaningful'])}")
    if report["settings"].get("quick"):
        line += "; a smoke run (--quick): its figures show the pipeline works, not what a full run retains"
    return line


def _bench(args) -> int:
    import subprocess
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = {"pbs": [["pbs_speed.py"]], "kernels": [["kernel_bench.py"]], "static": [["kernel_static.py"]],
               "overhead": [["overhead.py", "--repeats", "1"], ["step_overhead.py"]],
               "scale": [["scale.py"]], "retention": [["domain_retention.py"]]}
    chosen = args.only or list(scripts)
    for name in chosen:
        if name not in scripts:
            print(f"efx bench: error: --only {name!r}: expected one of {sorted(scripts)}", file=sys.stderr)
            return 2
    for name in chosen:
        for script, *options in scripts[name]:
            script = root / script
            if not script.is_file():
                print(f"efx bench: error: {script} not found (efx bench runs from a source checkout)", file=sys.stderr)
                return 2
            code = subprocess.call([sys.executable, str(script), *options, "--output", args.output])
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
