"""scripts/mutation_check.py stays in step with the code: each mutant's line is in its file
exactly once and would change it, and the tests it names exist, files or single test functions
(``path::test_name``, or one parametrization of one, ``path::test_name[id]``). The check
itself, which runs the tests on every mutant, takes minutes:
``python scripts/mutation_check.py [--native]``."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutation_check",
                                               ROOT / "scripts" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("mutant", mutation_check.MUTANTS, ids=lambda m: m.name)
def test_mutant_matches_the_code(mutant):
    assert (ROOT / mutant.path).read_text().count(mutant.old) == 1, \
        f"{mutant.path} changed: update the mutant {mutant.name!r}"
    assert mutant.new != mutant.old
    for test in mutant.tests:
        path, _, function = test.partition("::")
        function = function.partition("[")[0]  # one parametrization: its function
        assert (ROOT / path).is_file(), test
        assert not function or f"def {function}(" in (ROOT / path).read_text(), test


def test_mutant_names_are_unique():
    names = [m.name for m in mutation_check.MUTANTS]
    assert len(names) == len(set(names))
