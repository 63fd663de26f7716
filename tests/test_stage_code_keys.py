"""Each stage's key holds the code that computes its result, and only that (tasks.keys.StageCode):
an edit to the report, the flows, the CLI or the plumbing re-keys nothing; an edit to the scoring
code re-keys what scores; an edit to the training loop re-keys every training stage. No servers:
"editing" a module here means changing the source digest the key reads for it."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from tasks import keys

KINDS = ("prepare", "sft", "rl", "baseline", "evaluate")


def _codes(validating: bool = False) -> dict[str, keys.StageCode]:
    return {kind: keys.stage_code(kind, validates=validating) for kind in KINDS}


def test_each_stage_holds_the_library_it_runs_and_no_plumbing():
    codes = {kind: set(code.modules()) for kind, code in _codes().items()}
    for kind, modules in codes.items():
        assert "tasks.stage_spec" in modules, kind
        assert not {m for m in modules if m.split(".")[0] in ("flows", "colar_infra")}, kind
        assert not {m for m in modules if m.startswith("tasks.") and m not in
                    ("tasks.stage_spec", "tasks.prepare", "tasks.training", "tasks.evaluate")}, kind
    for kind in ("sft", "rl", "baseline"):
        assert {"tasks.training", "colar_core.training.loop", "colar_core.model", "colar_core.training.checkpoint",
                "colar_core.training.engines"} <= codes[kind], kind
    assert "colar_core.rl.grpo" in codes["rl"] and "colar_core.rl.grpo" not in codes["sft"]
    assert "colar_core.baselines.losses" in codes["baseline"] and "colar_core.baselines.losses" not in codes["sft"]
    # scoring: what scores answers holds it; training without validation does not
    assert "colar_core.scoring" in codes["evaluate"] and "colar_core.scoring" in codes["rl"]
    for kind in ("sft", "baseline", "prepare"):
        assert "colar_core.scoring" not in codes[kind] and keys.VALIDATION_MODULE not in codes[kind], kind
    assert {"colar_core.evaluation", "colar_core.inference", "tasks.evaluate"} <= codes["evaluate"]
    assert not {m for m in codes["evaluate"] if m.startswith("colar_core.training")}
    assert codes["prepare"] >= {"tasks.prepare", "colar_core.data.prepare", "colar_core.data.readers"}
    assert "colar_core.model" not in codes["prepare"]
    # a stage that validates during training runs generation and scoring
    validating = {kind: set(code.modules()) for kind, code in _codes(validating=True).items()}
    for kind in ("sft", "baseline"):
        assert {keys.VALIDATION_MODULE, "colar_core.scoring", "colar_core.inference"} <= validating[kind], kind


def _library_imports(module: str) -> set[str]:
    """The colar_core modules a task module imports (what it may call)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin
    found = set()
    for node in ast.walk(ast.parse(open(spec.origin, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("colar_core"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("colar_core"))
    return found


def test_every_library_module_a_task_imports_is_in_the_code_of_its_stages():
    """The guard on the hand-written entry points: a task that starts calling another library
    module without naming it in STAGE_ENTRIES fails here."""
    by_task: dict[str, set[str]] = {}
    for kind, code in _codes(validating=True).items():
        by_task.setdefault(code.task, set()).update(code.modules())
    for task, modules in by_task.items():
        missing = _library_imports(task) - modules
        assert not missing, f"{task} imports {sorted(missing)}, which no stage it runs holds in its key"


def test_the_walk_follows_imports_inside_functions_and_lazy_package_tables(tmp_path, monkeypatch):
    # colar_core.model imports the GGUF converter and the baselines' thought projection inside functions
    assert {"colar_core.gguf_import", "colar_core.baselines.thoughts"} <= set(keys.imported_modules("colar_core.model"))
    # colar_core.data's __init__ uses relative imports
    assert "colar_core.data.readers" in keys.imported_modules("colar_core.data")
    # a name a package hands out lazily (_LAZY) counts as its module
    assert keys._lazy_table("colar_core.training")["run_sft_stage"] == "sft"


def _digest_edit(monkeypatch, *edited: str) -> None:
    """Make the key read another source digest for the modules ``edited`` (as an edit would)."""
    real = keys.source_digest

    def digest(module: str) -> str:
        return "edited" + real(module) if module in edited else real(module)

    monkeypatch.setattr(keys, "source_digest", digest)


@pytest.mark.parametrize("edited,rekeyed", [
    (("tasks.report",), set()),
    (("flows.cli", "flows.pipeline", "colar_infra.servers", "colar_infra.tracking.runs"), set()),
    (("tasks.evaluate",), {"evaluate"}),
    (("colar_core.scoring",), {"rl", "evaluate"}),
    (("colar_core.training.loop",), {"sft", "rl", "baseline"}),
    (("colar_core.training.validation",), set()),
    (("colar_core.data.readers",), set(KINDS)),
    (("tasks.stage_spec",), set(KINDS)),
])
def test_an_edit_rekeys_the_stages_that_run_the_edited_code(monkeypatch, edited, rekeyed):
    before = {kind: code.digest() for kind, code in _codes().items()}
    _digest_edit(monkeypatch, *edited)
    after = {kind: code.digest() for kind, code in _codes().items()}
    assert {kind for kind in KINDS if after[kind] != before[kind]} == rekeyed


def test_a_stage_that_validates_is_rekeyed_by_the_scoring_code(monkeypatch):
    sft = keys.stage_code("sft", validates=True)
    before = sft.digest()
    _digest_edit(monkeypatch, "colar_core.scoring")
    assert sft.digest() != before
    assert keys.validates({"eval_every": 5}) and not keys.validates({"eval_every": 0})
