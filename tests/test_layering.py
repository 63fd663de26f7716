"""The layering the README promises: ``colar_core`` (the method) imports neither the pipeline nor
Prefect nor MLflow; ``colar_infra`` (servers, backends, tracking) sits on it; ``tasks`` and ``flows`` (the
DAG) on both; every package is laid out on disk as it imports; and ``colar data prepare`` needs neither
Prefect nor MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]

#: Each package and the packages it may import, lowest first: the method knows nothing of the pipeline
#: or of Prefect and MLflow; the plumbing knows the method but not the DAG; tasks know the plumbing; flows
#: compose tasks.
LAYERS = {
    "colar_core": set(),
    "colar_infra": {"colar_core"},
    "tasks": {"colar_core", "colar_infra"},
    "flows": {"colar_core", "colar_infra", "tasks"},
}
OURS = set(LAYERS)
#: Third-party packages a layer must not import, even lazily.
FORBIDDEN = {"colar_core": {"prefect", "mlflow"}}


def _named_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazily too), plus string constants that look like a
    dotted path into one of our packages (``"tasks.keys"``: a monkeypatch target or an import by name)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            if "." in node.value and node.value.split(".")[0] in OURS:
                names.add(node.value)
    return names


def _offenders(package: str) -> list[str]:
    allowed = LAYERS[package] | {package}
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name in _named_modules(path):
            top = name.split(".")[0]
            if (top in OURS and top not in allowed) or top in FORBIDDEN.get(package, ()):
                bad.append(f"{path.relative_to(REPO)}: {name}")
    return bad


def test_each_package_imports_only_the_layers_below_it():
    offenders = [line for package in LAYERS for line in _offenders(package)]
    assert not offenders, "imports against the layering (see LAYERS):\n" + "\n".join(offenders)


def test_the_check_above_catches_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from tasks.stages import evaluate_stage\nimport flows.cli\nx = 'tasks.keys'\n"
                   "def f():\n    import mlflow.entities\n")
    assert _named_modules(bad) >= {"tasks.stages", "flows.cli", "tasks.keys", "mlflow.entities"}


def test_pyproject_lists_every_package_folder_and_nothing_else():
    """Each package installs under the name its folder has: no package-dir mapping, so no module is
    importable under two names."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = meta["tool"]["setuptools"]
    assert "package-dir" not in tool
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for pkg in OURS for p in (REPO / pkg).rglob("__init__.py")}
    assert set(tool["packages"]) == on_disk, f"pyproject packages {sorted(tool['packages'])} != folders {sorted(on_disk)}"
    assert meta["project"]["scripts"]["colar"] == "flows.cli:main"


# Makes any import of prefect or mlflow fail, as on a machine where they are not installed.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prefect', 'mlflow'):
            raise ModuleNotFoundError('No module named ' + repr(name), name=name)
sys.meta_path.insert(0, _Block())
from flows.cli import main
rc = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow')]
sys.exit(rc)
"""


def test_data_prepare_runs_without_prefect_or_mlflow(tmp_path):
    out = subprocess.run([sys.executable, "-c", _BLOCK, "data", "prepare", "--input", "builtin", "--out",
                          str(tmp_path / "data"), "--n-train", "20", "--n-val", "4", "--n-test", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "data" / "manifest.json").is_file()
    # and the blocker really blocks: a pipeline command says plainly what is missing
    run = subprocess.run([sys.executable, "-c", _BLOCK, "compare"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "the pipeline needs prefect and mlflow" in run.stderr, run.stderr


# ---------------------------------------------------------------------------------------------
# tests and benchmarks: helpers several test modules share live in tests/helpers.py (what the
# benchmarks share too, in bench/), so no test module imports another, and bench never imports tests.


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, at any depth: ``from a.b import c`` counts
    as ``a.b``, ``from a import b`` as ``a.b`` (b may be a module), relative imports are resolved, and a
    string constant that is a dotted name under ``tests`` counts as an import by name (``importlib``,
    ``pytest_plugins``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = ".".join(p for p in (parent, base) if p)
            if "." in base:
                names.add(base)
            else:  # a top-level package: what is imported from it may be its modules
                names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            if len(parts) > 1 and parts[0] == "tests" and all(p.isidentifier() for p in parts):
                names.add(node.value)
    return names


def _test_and_bench_offenders(root: Path) -> list[str]:
    """``file: module`` for each import of a ``tests/test_*.py`` module by a file under ``root/tests``
    and each import of anything in ``tests`` by a file under ``root/bench``."""
    def a_test_module(name: str) -> bool:
        parts = name.split(".")
        return len(parts) > 1 and parts[0] == "tests" and parts[1].startswith("test_")

    rules = {"tests": a_test_module, "bench": lambda name: name.split(".")[0] == "tests"}
    bad = []
    for folder, forbidden in rules.items():
        for path in sorted((root / folder).rglob("*.py")):
            package = ".".join(path.relative_to(root).parent.parts)
            bad += [f"{path.relative_to(root)}: {name}" for name in sorted(_imported_modules(path, package))
                    if forbidden(name)]
    return bad


def test_no_test_module_imports_another_and_bench_never_imports_tests(tmp_path):
    assert _test_and_bench_offenders(REPO) == [], (
        "move what several test modules share into tests/helpers.py (or bench/, where the benchmarks need it)")

    # the check catches each way of doing it
    (tmp_path / "tests").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "tests" / "helpers.py").write_text("import os\n")
    (tmp_path / "tests" / "test_ok.py").write_text("from tests.helpers import x\nfrom bench.tiny import y\n")
    (tmp_path / "tests" / "test_a.py").write_text("from tests.test_b import TINY\n")
    (tmp_path / "tests" / "test_c.py").write_text("def f():\n    from tests import test_b\n")
    (tmp_path / "tests" / "test_d.py").write_text("from .test_b import helper\n")
    (tmp_path / "tests" / "test_e.py").write_text("import importlib\nimportlib.import_module('tests.test_b')\n")
    (tmp_path / "bench" / "x.py").write_text("def main():\n    import tests.helpers\n")
    (tmp_path / "bench" / "y.py").write_text("from tests.helpers import ROOT\n")
    assert _test_and_bench_offenders(tmp_path) == [
        "tests/test_a.py: tests.test_b", "tests/test_c.py: tests.test_b", "tests/test_d.py: tests.test_b",
        "tests/test_e.py: tests.test_b", "bench/x.py: tests.helpers", "bench/y.py: tests.helpers",
    ]
