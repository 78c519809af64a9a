"""tools/mutate.py plants bugs by replacing one text in one file: each mutant's text must be in
its file exactly once, or the mutant would plant nothing (or something else)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _mutants():
    spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


@pytest.mark.parametrize("mutant", _mutants(), ids=lambda m: m.name)
def test_every_mutant_names_text_that_is_in_its_file_once(mutant):
    count = (ROOT / mutant.path).read_text().count(mutant.before)
    assert count == 1, f"{mutant.name}: {mutant.path} holds its text {count} times"
    assert mutant.after != mutant.before
