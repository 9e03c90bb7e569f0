"""`bamba bench` over the comparison harness with transformers, benchmarks/bench.py of the source tree.

The harness stays out of the library (it needs transformers and measures, it does not serve); the
command finds it beside the package (an editable install) or in the current folder (a checkout).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

HARNESS = os.path.join("benchmarks", "bench.py")
_MODULE_NAME = "bamba_benchmarks_bench"  # (not `bench`: the harness is loaded from its file)


def harness_path() -> str:
    """benchmarks/bench.py of the checkout this package runs from, or of the current folder when that is
    a checkout of this project (`pip install .` users running `bamba bench` in their clone)."""
    source_tree = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # src/..
    for root in dict.fromkeys([source_tree, os.getcwd()]):
        path = os.path.join(root, HARNESS)
        if os.path.isfile(path) and os.path.isfile(os.path.join(root, "src", "bamba", "__init__.py")):
            return path
    raise FileNotFoundError(
        f"bamba bench runs {HARNESS} of a checkout of this project, found neither beside this installation "
        f"({source_tree}) nor in the current folder ({os.getcwd()}): run it in your clone"
    )


def harness() -> ModuleType:
    """The harness module (benchmarks/bench.py), imported once."""
    module = sys.modules.get(_MODULE_NAME)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, harness_path())
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # before running it: its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE_NAME]
        raise
    return module


def bench(**kwargs: Any) -> dict[str, Any]:
    """Run the side-by-side benchmark: benchmarks/bench.py's `bench`, its keyword arguments, its report."""
    return harness().bench(**kwargs)
