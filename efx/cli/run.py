"""The main job: from a general model to a verified sparse expert, with the dense LoRA
reference trained on the same budget and seed, both evaluated, and a report.

Each stage writes its result atomically into the output folder; a rerun with `resume=True`
skips the stages already completed.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from efx import distributed
from efx.data.suites import load_suite
from efx.evaluation.evaluate import evaluate, retention
from efx.io import atomic_folder, atomic_write_text, check_output_free
from efx.measure import measure
from efx.model.loading import check_trainable, load_model, resolve_device, resolve_dtype
from efx.recipes import calibration_batches, prune_and_adapt, unload
from efx.method.prune import FORESIGHT_METHODS, METHODS, PruneConfig
from efx.method.schedule import STATISTICS, record_window
from efx.model.adapter import ADAPTER, load_adapter, save_with_adapter
from efx.model.checkpoint import save_sparse
from efx.evaluation.report import sparsity_audit, versions, write_report
from efx.model.sparse_linear import SparseLoRALinear, to_sparse_lora
from efx.training import LoraSettings, TrainSettings, train_lora

log = logging.getLogger(__name__)

RUN_METHODS = METHODS + ("dense",)
# Choices differ in length (term names, license names): length-normalized log-likelihood is the
# headline score; raw accuracy is reported beside it.
HEADLINE_METRIC = "accuracy_norm"


@dataclass
class RunSettings:
    """Everything `efx run` does; also the schema of its config file (JSON or YAML)."""

    model: str | None = None
    """Model folder, .gguf file or cached hub id; None = the embedded SmolLM2-135M-Instruct."""
    domain: str = "medical"
    """"medical", "legal", or a path to user data (JSONL file or folder)."""
    method: str = "efficientxpert"
    """efficientxpert, foresight, wanda, sparsegpt, magnitude or dense (no pruning)."""
    sparsity: float = 0.4
    """Target sparsity (unstructured)."""
    pattern: str = "unstructured"
    """unstructured, 2:4 or 4:8."""
    preset: str = "efx"
    """ForeSight/PBS preset: efx or paper."""
    pipeline: str | None = None
    """Baseline pipeline: lora-prune or prune-lora-reprune (EfficientXpert always prunes inside)."""
    keep_adapter: bool = False
    """End with the base pruned and the trained adapter kept beside it, unmerged: expert/ holds the sparse base
    (dense with zeros) and expert/adapter/ the peft adapter (efx eval and efx export pick it up; lm-eval loads
    it with peft=, vLLM with LoRA enabled)."""
    reset_optimizer: bool = False
    """EfficientXpert on the epoch schedule (--preset paper): clear the optimizer state after each pruning call,
    which re-initializes the adapter (the authors keep the state)."""
    statistics: str = "auto"
    """EfficientXpert/ForeSight activation statistics: calibration (a calibration pass over --calib sequences per
    pruning call; on the ramp it also yields E[x x^T], with which each call rebuilds the weights the ForeSight
    mask keeps) or training (recorded during the training forwards of the last steps before each call that hold
    --calib sequences: no extra forward pass, no rebuild). auto: calibration on the ramp (the retention grid's
    best recipe), training on the epoch schedule and under --fsdp; the baselines always run a calibration
    pass."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: float = 16.0
    """LoRA alpha."""
    epochs: int = 3
    """Training epochs (the efx preset's ramp prunes during the first two thirds of training, the paper preset
    at the start of epochs 2..E; both prune once more at the end)."""
    n_examples: int = 160
    """Training examples per epoch, drawn from the suite's training pool."""
    batch_size: int = 8
    """Training batch size."""
    learning_rate: float = 1e-3
    """Peak learning rate. The CPU budget (60 steps) uses 1e-3: at the paper's 2e-4 the adapter
    barely moves in so few steps (legal license_category, validation: 0.40 at 2e-4, 0.62 at 1e-3)."""
    calib: int = 32
    """Calibration sequences (domain training text)."""
    eval_items: int | None = None
    """Evaluate on the first N items of each task (None = all)."""
    eval_base: bool = False
    """Also evaluate the untouched base model."""
    seed: int = 0
    """Seed of data sampling, adapter initialization and dropout."""
    dtype: str = "float32"
    """Parameter dtype of the model: float32, bfloat16 or float16 (float16 only on a GPU). The expert is saved
    in it; in bfloat16/float16 the Trainer trains under autocast and peft keeps the LoRA factors in float32."""
    device: str = "auto"
    """auto (the first GPU when there is one, else the CPU), cpu, cuda or cuda:N."""
    max_length: int = 128
    """Tokens per training example (the prompt is cut from the left beyond it)."""
    grad_accum: int = 1
    """Forwards per optimizer step (a step takes --batch-size x --grad-accum examples)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward instead of keeping them (less memory, more time)."""
    fsdp: bool = False
    """Shard the model over the processes of a distributed launch with FSDP2 (torchrun --nproc-per-node N efx run
    --fsdp): for models that do not fit on one device. Pruning calls gather one block at a time; they use the
    statistics recorded during training. Without it a distributed launch trains with DDP."""
    work_dir: str | None = None
    """Folder for the files pruning writes (score memory, previous masks, undo); default: the system's temporary
    folder. Removed when the run ends."""
    quick: bool = False
    """Set by --quick: a smoke run, whose figures show that the pipeline works, not what it retains."""

    @classmethod
    def quick_run(cls, **overrides) -> "RunSettings":
        """A smoke-run budget that finishes in about 3 minutes on a 2-core CPU."""
        return cls(**{"epochs": 2, "n_examples": 32, "calib": 16, "eval_items": 50, **overrides, "quick": True})

    def validate(self) -> None:
        if self.method not in RUN_METHODS:
            raise ValueError(f"--method {self.method!r}: expected one of {RUN_METHODS}")
        if self.pipeline not in (None, "lora-prune", "prune-lora-reprune"):
            raise ValueError(f"--pipeline {self.pipeline!r}: expected lora-prune or prune-lora-reprune")
        if self.method in FORESIGHT_METHODS and self.pipeline:
            raise ValueError("--pipeline applies to the baselines; EfficientXpert prunes inside training")
        if self.epochs < 2 and self.method in FORESIGHT_METHODS:
            raise ValueError("EfficientXpert needs --epochs >= 2 (epoch 1 is plain LoRA)")
        check_trainable(resolve_dtype(self.dtype), resolve_device(self.device))
        if self.work_dir is not None and Path(self.work_dir).exists() and not Path(self.work_dir).is_dir():
            raise ValueError(f"--work-dir {self.work_dir} is a file, not a folder")
        for name in ("n_examples", "batch_size", "calib", "lora_r", "max_length", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if self.statistics not in ("auto", *STATISTICS):
            raise ValueError(f"--statistics {self.statistics!r}: expected auto or one of {STATISTICS}")
        if self.method not in FORESIGHT_METHODS:
            inside = (["reset_optimizer"] if self.reset_optimizer else []) + \
                (["statistics training"] if self.statistics == "training" else [])
            if inside:
                raise ValueError(f"--{inside[0].replace('_', '-')} applies to efficientxpert and foresight "
                                 f"(pruning inside training), not --method {self.method}")
        if self.reset_optimizer and self.callback_schedule == "ramp":
            raise ValueError("--reset-optimizer applies where a pruning call re-initializes the adapter (--preset "
                             "paper); with the efx preset the base is pruned on a ramp and one adapter trains "
                             "throughout")
        if self.keep_adapter and self.method == "dense":
            raise ValueError("--keep-adapter applies to pruning methods: --method dense prunes nothing")
        if self.method != "dense":
            self.prune_config().validate()
        if self.fsdp:
            if not distributed.launched():
                raise ValueError("--fsdp shards the model over the processes of a distributed launch: run "
                                 "torchrun --nproc-per-node N efx run --fsdp ... (or accelerate launch)")
            if self.method != "dense" and (self.method not in FORESIGHT_METHODS
                                           or self.callback_statistics != "training"):
                raise ValueError("--fsdp prunes with the statistics recorded during training: efficientxpert or "
                                 "foresight with --statistics training (the default), or --method dense; the "
                                 "calibration pass and the baselines run blocks on their own, outside the sharded "
                                 "forward")
        if self.domain not in ("medical", "legal") and not Path(self.domain).exists():
            raise ValueError(f"--domain {self.domain!r}: expected medical, legal or an existing path")

    @property
    def callback_statistics(self) -> str:
        """The statistics the pruning calls use ("auto" resolved)."""
        if self.statistics != "auto":
            return self.statistics
        if self.method not in FORESIGHT_METHODS:
            return "calibration"
        return "calibration" if self.callback_schedule == "ramp" and not self.fsdp else "training"

    @property
    def reconstruct(self) -> bool:
        """Whether each pruning call rebuilds the kept weights under the ForeSight mask (`PruneConfig.reconstruct`;
        at N:M the rebuild's solve also chooses each group's keeps): on the ramp with calibration statistics, which
        hold the E[x x^T] the rebuild needs."""
        return self.method in FORESIGHT_METHODS and self.callback_schedule == "ramp" \
            and self.callback_statistics == "calibration"

    @property
    def callback_record_steps(self) -> int | None:
        """The recording window of training statistics in optimizer steps (None: nothing recorded)."""
        if self.callback_statistics != "training":
            return None
        return record_window(self.calib, self.batch_size * self.grad_accum)

    @property
    def callback_schedule(self) -> str:
        """The pruning schedule: the ramp for the efx preset (the base pruned gradually under one adapter,
        in one cut for an N:M pattern: the retention grid's best EfficientXpert recipe), else the authors'
        epoch schedule (the paper preset reproduces it)."""
        return "ramp" if self.preset == "efx" else "epoch"

    def callback_kwargs(self) -> dict:
        """The `EfficientXpertCallback` options of these settings."""
        return {"statistics": self.callback_statistics, "schedule": self.callback_schedule,
                "reset_optimizer": self.reset_optimizer}

    def prune_config(self) -> PruneConfig:
        return PruneConfig(method=self.method, sparsity=self.sparsity, pattern=self.pattern, preset=self.preset,
                           reconstruct=self.reconstruct, seed=self.seed)

    def lora(self) -> LoraSettings:
        return LoraSettings(r=self.lora_r, alpha=self.lora_alpha)

    def training(self) -> TrainSettings:
        extra = {"ddp_timeout": distributed.TIMEOUT_S}
        if distributed.launched() and resolve_device(self.device).type == "cpu":
            extra["ddp_backend"] = "gloo"
        return TrainSettings(epochs=self.epochs, n_examples=self.n_examples, batch_size=self.batch_size,
                             grad_accum=self.grad_accum, gradient_checkpointing=self.gradient_checkpointing,
                             learning_rate=self.learning_rate, max_length=self.max_length, seed=self.seed,
                             extra_args=extra)

    def load(self, path=None):
        """(model, tokenizer) of `path` (default: the settings' model) in the settings' dtype and device."""
        return load_model(self.model if path is None else path, dtype=self.dtype, device=self.device, fsdp=self.fsdp)


def load_settings(path: str | Path) -> dict:
    """Settings from a JSON or YAML file; unknown keys are an error."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    known = {f.name for f in fields(RunSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return data


class Stages:
    """Completed stages of a run, kept as JSON files in `<output>/stages/`."""

    def __init__(self, folder: Path):
        self.folder = folder / "stages"

    def get(self, name: str):
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, name: str, value) -> None:
        if distributed.is_main():  # every rank computed the same value; one writes it
            atomic_write_text(self.folder / f"{name}.json", json.dumps(value))


def prepare_output(output: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty folder unless told to overwrite it or resume in it."""
    if resume and output.is_dir() and any(output.iterdir()):
        if not (output / "stages").is_dir():
            raise FileExistsError(f"--resume: {output} holds no efx run to resume")
        return
    if check_output_free(output, overwrite=overwrite,
                         remedy="pass --overwrite to replace it or --resume to continue its run"):
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def run(settings: RunSettings, output: str | Path, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Train the dense LoRA reference and the sparse expert, evaluate both, save the expert and
    write report.json, report.md and plots into `output`. Returns the report."""
    settings.validate()
    output = Path(output)
    if distributed.is_main():
        prepare_output(output, overwrite=overwrite, resume=resume)
    if settings.work_dir is not None:
        Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    if distributed.launched():
        distributed.init(resolve_device(settings.device))
        distributed.barrier()  # the output folder is ready (a refusal on rank 0 ends the job)
    stages = Stages(output)
    saved = stages.get("settings")
    if saved is not None and saved != asdict(settings):
        raise ValueError(f"--resume: {output} was run with other settings; start a new output folder")
    stages.put("settings", asdict(settings))
    started = time.perf_counter()
    record: dict = {}
    with measure(record, "load"):
        model, tokenizer = settings.load()
        suite = load_suite(settings.domain, seed=settings.seed)
    eval_kwargs = {"max_items": settings.eval_items}

    base_eval = stages.get("base_eval")
    if settings.eval_base and base_eval is None:
        with measure(record, "base_eval"):
            base_eval = evaluate(model, tokenizer, suite, **eval_kwargs)
        stages.put("base_eval", base_eval)

    # The dense reference and the expert are never alive together: the reference trains on the
    # loaded model and leaves only its scores; the expert trains on a fresh load.
    dense = stages.get("dense")
    if dense is None:
        dense_record: dict = {}
        with measure(dense_record, "dense_train"):
            model, stats = train_lora(model, tokenizer, suite.train, lora=settings.lora(),
                                      training=settings.training(), system=suite.system)
        with measure(dense_record, "dense_eval"):
            dense_eval = evaluate(model, tokenizer, suite, **eval_kwargs)
        dense = {"eval": dense_eval, "measure": dense_record, "train_loss": stats["train_loss"]}
        stages.put("dense", dense)
        model = None
        _free_memory()
    record.update(dense["measure"])

    expert_stage = stages.get("expert")
    if expert_stage is None or not (output / "expert" / "config.json").is_file():
        if model is None:
            model, _ = settings.load()
        expert_stage = _train_expert(model, tokenizer, suite, settings, output)
        stages.put("expert", expert_stage)
    model = None
    _free_memory()
    expert, _ = settings.load(output / "expert")
    audit = sparsity_audit(expert, output / "expert")  # the base, as saved
    if settings.keep_adapter:
        expert = load_adapter(expert, output / "expert" / ADAPTER)
    record.update(expert_stage["measure"])

    expert_eval = stages.get("expert_eval")
    if expert_eval is None:
        with measure(record, "expert_eval"):
            expert_eval = evaluate(expert, tokenizer, suite, **eval_kwargs)
        stages.put("expert_eval", expert_eval)

    expert_train = record.get("expert_train") or record.get("train") or {}
    report = {
        "settings": asdict(settings), "versions": versions(), "suite_info": suite.info,
        "base_eval": base_eval, "dense_eval": dense["eval"], "expert_eval": expert_eval,
        "retention": retention(expert_eval, dense["eval"], metric=HEADLINE_METRIC),
        "retention_raw": retention(expert_eval, dense["eval"], metric="accuracy"),
        "sparsity": audit, "prune_calls": expert_stage.get("calls", []),
        "statistics": settings.callback_statistics if settings.method in FORESIGHT_METHODS else None,
        "schedule": settings.callback_schedule if settings.method in FORESIGHT_METHODS else None,
        "reconstruct": settings.reconstruct,
        "record_steps": settings.callback_record_steps if settings.method in FORESIGHT_METHODS else None,
        "packed": expert_stage.get("packed"),
        "distributed": {"world_size": distributed.world_size(),
                        "strategy": "fsdp2" if settings.fsdp else "ddp" if distributed.launched() else None,
                        "peak_rss_mb_per_rank": distributed.peak_rss_mb_per_rank()},
        "measure": record,
        "cost": {"time_ratio": expert_train["seconds"] / record["dense_train"]["seconds"],
                 "memory_ratio": expert_train["peak_rss_mb"] / record["dense_train"]["peak_rss_mb"]},
        "wall_seconds": time.perf_counter() - started,
    }
    if distributed.is_main():
        write_report(report, output)
        log.info("report written to %s", output / "report.md")
    distributed.barrier()
    return report


def _save_sharded(model, tokenizer, settings: RunSettings, output: Path) -> None:
    """Save a model sharded with FSDP2 once: every rank takes part in gathering each tensor, rank 0
    writes them into a temporary folder that replaces `expert/` in one rename. No packed checkpoint
    is made (it would need the whole model in one process): `efx export` makes one from `expert/`."""
    tmp = output / ".expert.sharded.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    main = distributed.is_main()
    if settings.keep_adapter:
        save_with_adapter(model, tokenizer, tmp, is_main_process=main)
    else:
        model.save_pretrained(tmp, is_main_process=main)
        if main:
            tokenizer.save_pretrained(tmp)
    if main:
        config = json.loads((tmp / "config.json").read_text())
        if config.pop("distributed_config", None) is not None:  # the folder loads anywhere, unsharded
            atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        if (output / "expert").exists():
            shutil.rmtree(output / "expert")
        tmp.rename(output / "expert")
    distributed.barrier()


def _free_memory() -> None:
    """Give back the memory of what was just dropped (the caller has set its last reference to None)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_expert(model, tokenizer, suite, settings: RunSettings, output: Path) -> dict:
    record: dict = {}
    calls: list = []
    if settings.method == "dense":
        with measure(record, "expert_train"):
            model, _ = train_lora(model, tokenizer, suite.train, lora=settings.lora(), training=settings.training(),
                                  system=suite.system)
        model = unload(model)
    else:
        calib = calibration_batches(tokenizer, suite.train, n=settings.calib, seed=settings.seed,
                                    system=suite.system)
        pipeline = "inside" if settings.method in FORESIGHT_METHODS else \
            (settings.pipeline or "lora-prune")
        with measure(record, "expert_train"):
            model, report = prune_and_adapt(model, tokenizer, suite.train, prune=settings.prune_config(),
                                            lora=settings.lora(), training=settings.training(), pipeline=pipeline,
                                            calib=calib, system=suite.system,
                                            work_dir=settings.work_dir, keep_adapter=settings.keep_adapter,
                                            callback_kwargs=settings.callback_kwargs())
        calls = report["calls"]
    if settings.fsdp:
        _save_sharded(model, tokenizer, settings, output)
        return {"measure": record, "calls": calls, "packed": None}
    packed = _save(model, tokenizer, settings, output) if distributed.is_main() else None  # DDP: ranks agree
    distributed.barrier()
    return {"measure": record, "calls": calls, "packed": packed}


def _save(model, tokenizer, settings: RunSettings, output: Path) -> dict:
    """`expert/` (and `expert/adapter/`) and the packed checkpoint `expert_packed/`."""
    with atomic_folder(output / "expert", overwrite=True) as folder:
        if settings.keep_adapter:
            model = save_with_adapter(model, tokenizer, folder)
            model = load_adapter(model, folder / ADAPTER)  # packed below with the adapter in it
        else:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    fmt = "2:4" if settings.pattern == "2:4" else "bitmap"
    packed = to_sparse_lora(model, format=fmt, rank=settings.lora_r, alpha=settings.lora_alpha)
    save_sparse(packed, output / "expert_packed", tokenizer, overwrite=True)
    sizes = [(m.packed.nbytes, m.packed.dense_nbytes) for m in packed.modules() if isinstance(m, SparseLoRALinear)]
    return {"format": fmt, "byte_ratio": sum(a for a, _ in sizes) / sum(b for _, b in sizes)}
