"""The layering the README promises: ``colar_core`` is a library that knows nothing of the pipeline,
the pipeline installs under the ``colar`` namespace, and ``colar data prepare`` needs neither Prefect
nor MLflow."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE_PACKAGES = ("flows", "tasks", "colar.flows", "colar.tasks", "colar")


def _named_modules(path: Path) -> set[str]:
    """Every module a file imports, plus string constants that look like a dotted module path."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier() is False:
            first = node.value.split(".")[0]
            if "." in node.value and " " not in node.value and first in PIPELINE_PACKAGES:
                names.add(node.value)
    return names


def test_no_colar_core_module_names_the_pipeline_packages():
    offenders = []
    for path in sorted((REPO / "colar_core").rglob("*.py")):
        for name in _named_modules(path):
            if name.split(".")[0] in ("flows", "tasks") or name == "colar" or name.startswith("colar."):
                offenders.append(f"{path.relative_to(REPO)}: {name}")
    assert not offenders, "colar_core must not depend on the pipeline:\n" + "\n".join(offenders)


def test_the_check_above_catches_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from colar.tasks.stages import evaluate_stage\nimport flows.cli\nx = 'tasks.keys'\n")
    assert _named_modules(bad) >= {"colar.tasks.stages", "flows.cli", "tasks.keys"}


def test_pipeline_installs_under_the_colar_namespace_and_lists_every_package():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = meta["tool"]["setuptools"]
    packages = set(tool["packages"])
    assert not packages & {"flows", "tasks"}, "generic top-level names would clash in a user's environment"
    assert tool["package-dir"] == {"colar.flows": "flows", "colar.tasks": "tasks"}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "colar_core").rglob("__init__.py")}
    on_disk |= {"colar.flows", "colar.tasks"}
    assert packages == on_disk, f"pyproject packages {sorted(packages)} != folders {sorted(on_disk)}"
    assert meta["project"]["scripts"]["colar"] == "colar.flows.cli:main"


# Makes any import of prefect or mlflow fail, as on a machine where they are not installed.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prefect', 'mlflow'):
            raise ModuleNotFoundError('No module named ' + repr(name), name=name)
sys.meta_path.insert(0, _Block())
from colar.flows.cli import main
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
