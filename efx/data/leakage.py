"""The leak check of the built-in suites: no evaluation text may be a near-duplicate of a text
the model trains on (or, for test items, of a validation text).

Near-duplicate, as defined here: the last `WINDOW` characters of an item's prompt body (the
text under its question line, lower-cased, whitespace collapsed; the whole body when shorter)
occur in one of the other split's texts, normalized the same way. Near-identical licences
split under different keys (OpenLDAP 2.4 in one split, 2.2.2 in another) and definitions shared
by two HPO terms are caught this way. The built-in suites also split licences by family
(`license_family`), so that versions of one licence share a split in the first place.
"""
from __future__ import annotations

import re
from collections import defaultdict

WINDOW = 200
_K, _STRIDE = 50, 25  # indexed substrings of the corpus: K characters every STRIDE (K + STRIDE <= WINDOW)


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def body(prompt: str) -> str:
    """A prompt without its question line (the text that differs between items)."""
    head, sep, rest = prompt.partition("\n")
    return rest if sep else head


def license_family(key: str) -> str:
    """A licence key without its version numbers: "openldap-2.2.2" and "openldap-2.4" are
    "openldap", "gpl-2.0-plus" is "gpl-plus"."""
    family = re.sub(r"[-_.]*v?\d+(?:[._]\d+)*", "", key.lower())
    return family.strip("-_.") or key.lower()


class Corpus:
    """Texts indexed for the question "does this window occur in one of them?"."""

    def __init__(self, texts):
        self.texts = [normalize(t) for t in texts]
        self.index: dict[int, list[int]] = defaultdict(list)
        for number, text in enumerate(self.texts):
            for start in range(0, max(len(text) - _K, 0) + 1, _STRIDE):
                self.index[hash(text[start:start + _K])].append(number)

    def contains(self, window: str) -> bool:
        """Whether `window` (normalized, at least K + STRIDE characters, or any length for a text
        shorter than that) occurs in one of the texts."""
        if len(window) < _K + _STRIDE:
            return any(window in text for text in self.texts)
        # an occurrence at position q covers the indexed start p = the next multiple of STRIDE,
        # whose K characters are the window's at offset p - q < STRIDE
        candidates = {n for offset in range(_STRIDE) for n in self.index.get(hash(window[offset:offset + _K]), ())}
        return any(window in self.texts[n] for n in candidates)


def tail(prompt: str) -> str:
    text = normalize(body(prompt))
    return text[-WINDOW:]


def leaked(items: list[dict], corpus: Corpus) -> list[bool]:
    """For each multiple-choice item, whether its prompt's tail occurs in `corpus`."""
    return [corpus.contains(tail(it["prompt"])) for it in items]
