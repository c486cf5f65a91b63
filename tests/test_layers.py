"""The package's layers: every import goes downwards, each function-level import says why, and serving a model
loads no training code."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

# Bottom to top. A module may import the package itself (its version and disclaimer) and the modules before it;
# never one after it. docs/design.md describes each layer.
LAYERS = {
    "base": ["errors", "files", "console", "labels", "config"],
    "data": ["images", "calibration", "card", "check", "duplicates", "data", "download"],
    "numbers and serving": ["metrics", "subgroups", "predictor", "runtime"],
    "the fastai pipeline": ["presize", "augment", "datablock", "losses"],
    "the model": ["arch", "pretrained", "model", "rebuild", "inference", "activations"],
    "prediction": ["gradcam", "classifier", "predict"],
    "reporting": ["tables", "plotting"],
    "training and evaluation": ["distributed", "callbacks", "dermoscopy", "export", "onnx_export", "train", "evaluate"],
    "front ends": ["app", "cli", "__main__"],
}
ORDER = [m for modules in LAYERS.values() for m in modules]
PACKAGE = ROOT / "skincancer"
TRAINING = {"train", "callbacks", "distributed", "dermoscopy", "export", "onnx_export", "evaluate"}


def imports(module: str) -> list[tuple[int, str, bool]]:
    """(line, imported package module, inside a function) for every import of the package in `module`."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level:  # from . import x / from .x import y
            base = node.module
            targets = [base] if base else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skincancer"):
            rest = node.module.split(".")[1:]
            targets = rest[:1] or [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("skincancer.")]
        for target in targets:
            found.append((node.lineno, target.split(".")[0], id(node) in in_function))
    return found


def test_every_module_has_a_layer():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules, "place each new module in LAYERS (and in docs/design.md)"


@pytest.mark.parametrize("module", ORDER)
def test_imports_go_only_downwards(module):
    upward = [f"{module}.py:{line} imports {target}" for line, target, _ in imports(module)
              if target in ORDER and ORDER.index(target) >= ORDER.index(module)]
    assert not upward, upward


def test_the_walk_sees_imports_inside_functions_too():
    # cli imports its commands' modules when they run; the walk must find those
    assert {("train", True), ("predict", True)} <= {(target, inside) for _, target, inside in imports("cli")}


def test_each_import_inside_a_function_says_why():
    unexplained = []
    for module in ORDER:
        lines = (PACKAGE / f"{module}.py").read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or "#" in lines[node.lineno - 1]:
                    continue
                i = node.lineno - 2  # up through the block of imports and blank lines to what stands above it
                while i >= 0 and (not lines[i].strip() or lines[i].strip().startswith(("import ", "from "))):
                    i -= 1
                if i < 0 or not lines[i].strip().startswith("#"):
                    unexplained.append(f"{module}.py:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "import at the top, or say in a comment why not: " + "; ".join(unexplained)


def loaded_after(code: str) -> set[str]:
    """The package's modules loaded by a fresh interpreter after running `code`."""
    run = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                          "print(' '.join(m.split('.')[1] for m in sys.modules if m.startswith('skincancer.')))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(run.stdout.split())


def test_serving_loads_no_training_code():
    loaded = loaded_after("import skincancer.predict")
    assert "predict" in loaded and not loaded & TRAINING, loaded & TRAINING
    assert not loaded_after("import skincancer.app") & TRAINING


def test_the_command_line_starts_without_torch():
    run = subprocess.run([sys.executable, "-c", "import sys\nfrom skincancer import cli\ncli.build_parser()\n"
                          "print('torch' in sys.modules, 'fastai' in sys.modules, 'pandas' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.stdout.split() == ["False", "False", "False"], run.stdout + run.stderr[-1000:]
