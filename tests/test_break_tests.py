"""benchmarks/break_tests.py's list of deliberate breaks stays applicable as the code moves: each text it
replaces occurs exactly once in its file, and each test it names exists (issue 23)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def load():
    spec = importlib.util.spec_from_file_location(
        "break_tests", os.path.join(ROOT, "benchmarks", "break_tests.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_every_break_applies_once_and_names_existing_tests():
    module = load()
    assert len({(b.item, b.what) for b in module.BREAKS}) == len(module.BREAKS)  # no row twice
    for brk in module.BREAKS:
        assert brk.edits and brk.tests, brk.what
        for path, old, new in brk.edits:
            assert path.split("/")[0] in module.COPIED, f"{brk.what}: {path} is not in the copied folders"
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                n = f.read().count(old)
            assert n == 1, f"{brk.what}: {path} holds the text to replace {n} times, expected once: {old!r}"
            assert new != old, brk.what
        for node in brk.tests:
            path, name = node.split("::")
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", f.read(), re.M), (
                    f"{node}: no such test"
                )


def test_a_break_is_applied_to_a_copy(tmp_path):
    module = load()
    brk = module.BREAKS[0]
    module.copy_tree(str(tmp_path))
    module.apply(str(tmp_path), brk)
    path, old, new = brk.edits[0]
    with open(tmp_path / path, encoding="utf-8") as f:
        broken = f.read()
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        assert f.read().replace(old, new) == broken  # the tree itself is left as it was
    with pytest.raises(ValueError, match="expected the text to break exactly once, found 0"):
        module.apply(str(tmp_path), brk)  # applied already: the text is gone


@pytest.mark.parametrize(
    "rc, last, result",
    [
        (1, "2 failed in 3.0s", "caught"),
        (1, "1 failed, 1 passed in 3.0s", "partly (1 failed, 1 passed)"),
        (1, "3 failed in 3.0s", "caught"),  # a test id without its parameters: all of them
        (0, "2 passed in 3.0s", "NOT CAUGHT"),
        (0, "2 skipped in 1.0s", "ERROR"),  # nothing ran
        (4, "ERROR: not found: tests/x.py::y", "ERROR"),
        (2, "1 error in 1.0s", "ERROR"),  # e.g. a break that does not import
    ],
)
def test_verdicts(rc, last, result):
    assert load().verdict(rc, last, ("a", "b"), broken=True) == result
