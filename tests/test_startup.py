"""Start-up stays light and the modules stay layered: the CLI and the package import neither torch
nor matplotlib, and no module imports one above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import anomap
from anomap.cli import main

HEAVY = ("torch", "torchvision", "matplotlib", "scipy", "jinja2", "anomap.detectors")
SOURCE = Path(anomap.__file__).parent

# Each module may import, at module level, only modules of a lower layer.
LAYERS = {
    "__version__": 0,  # from the package root, whose __init__ imports nothing when loaded
    "errors": 0,
    "_rng": 0,
    "_io": 0,
    "metric_table": 0,
    "prediction": 0,
    "params": 0,
    "_images": 1,
    "metrics": 1,
    "runfolder": 1,
    "data": 2,
    "backbones": 3,
    "encoder": 3,
    "ops": 3,
    "detectors": 3,
    "plots": 4,
    "pictures": 4,
    "shift": 4,
    "protocol": 4,
    "report": 5,
    "evaluation": 6,
    "benchmark": 7,
    "runs": 7,
    "commands": 8,
    "cli": 9,
}
CHECKED = (
    "_rng",
    "metric_table",
    "plots",
    "pictures",
    "shift",
    "protocol",
    "report",
    "evaluation",
    "benchmark",
    "runs",
    "commands",
    "cli",
)


def imported_modules(code: str) -> list[str]:
    """Names imported at run time by `anomap.<x>` statements outside functions and TYPE_CHECKING blocks."""
    found = []
    for node in ast.parse(code).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found += [node.module] if node.module else [alias.name for alias in node.names]
    return [name.split(".")[0] for name in found]


def modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize(
    "statement",
    ["import anomap", "import anomap.cli", "from anomap.cli import build_parser; build_parser().format_help()"],
)
def test_start_up_imports_nothing_heavy(statement):
    loaded = modules_loaded_by(statement)
    assert not [name for name in HEAVY if name in loaded]


def test_a_lite_model_loads_and_predicts_without_torchvision(tmp_path):
    """torchvision's import costs about a second of a one-image `anomap predict`; the
    EfficientNet-Lite backbones do not need it."""
    from conftest import patchcore_file

    model = patchcore_file(tmp_path)
    statement = (
        f"from anomap import load; import numpy; load({str(model)!r}).predict([numpy.zeros((40, 40, 3), 'uint8')])"
    )
    loaded = modules_loaded_by(statement)
    assert "torch" in loaded and "torchvision" not in loaded


def test_help_and_version_print_without_heavy_imports(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"anomap {metadata.version('anomap')}" == f"anomap {anomap.__version__}"
    code = "from anomap.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    assert not [name for name in HEAVY if name in modules_loaded_by(f"exec({code!r})")]


@pytest.mark.parametrize("module", CHECKED)
def test_no_module_imports_one_above_it(module):
    names = imported_modules((SOURCE / f"{module}.py").read_text(encoding="utf-8"))
    unknown = sorted(set(names) - set(LAYERS))
    assert not unknown, f"give {unknown} a layer in LAYERS"
    above = [name for name in names if LAYERS[name] >= LAYERS[module]]
    assert not above, f"anomap.{module} (layer {LAYERS[module]}) imports {above}"


def test_the_layer_check_sees_imports():
    code = "from . import report\nfrom .pictures import save_png\nif X:\n    from .runs import demo\n"
    assert imported_modules(code) == ["report", "pictures"]
