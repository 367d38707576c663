"""The leak check: near-duplicates by hand, the licence family rule, and the built-in suites
with no evaluation item that leaks from training."""
import pytest

from efx.data import leakage
from efx.data.leakage import Corpus, leaked, license_family


def test_license_family_drops_version_numbers():
    assert license_family("openldap-2.4") == license_family("openldap-2.2.2") == "openldap"
    assert license_family("gpl-2.0-plus") == "gpl-plus" and license_family("GPL-3.0") == "gpl"
    assert license_family("cc-by-sa-4.0") == "cc-by-sa" != license_family("cc-by-4.0")
    assert license_family("mit") == "mit" and license_family("1.0") == "1.0"


@pytest.mark.parametrize("offset", [0, 1, 24, 25, 26, 137])
def test_a_window_is_found_wherever_it_sits_in_a_text(offset):
    import random
    rng = random.Random(offset)
    words = [" ".join(rng.choice("abcdefgh") * rng.randint(1, 6) for _ in range(80)) for _ in range(3)]
    window = leakage.normalize(words[1])[offset:offset + leakage.WINDOW]
    corpus = Corpus([words[0], "prefix text " + words[1].upper() + "\n suffix", words[2]])
    assert corpus.contains(window)  # case and whitespace do not hide it
    assert not corpus.contains(window[:-1] + "#")  # one character off is not a duplicate
    assert not Corpus([words[0], words[2]]).contains(window)


def test_items_leak_by_the_tail_of_their_body():
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software " * 4
    train = Corpus([f"Quote the beginning of the MIT License.\n{text} and the rest."])
    items = [{"prompt": f"Which license category fits the license that begins:\n{text[40:]}"},
             {"prompt": f"Which license category fits the license that begins:\n{text[40:-30]} but changed"},
             {"prompt": "Which license does this notice refer to?\nshort notice"},
             {"prompt": 'Which ICD-10-CM chapter classifies the diagnosis "Cholera"?'}]
    assert leaked(items, train) == [True, False, False, False]
    assert leaked(items[2:3], Corpus(["a SHORT   notice here"])) == [True]  # short bodies: the whole body


def test_built_in_suites_hold_no_evaluation_item_that_leaks_from_training():
    from efx.data.suites import load_suite
    for name in ("medical", "legal"):
        suite = load_suite(name)
        trained = [ex["prompt"] + "\n" + ex["completion"] for ex in suite.train]
        val = [it["prompt"] for items in suite.val.values() for it in items]
        for task, items in suite.tasks.items():
            assert not any(leaked(items, Corpus(trained + val))), (name, task)
        for task, items in suite.val.items():
            assert not any(leaked(items, Corpus(trained))), (name, task)
        assert suite.info["leak_check"]["window"] == leakage.WINDOW
