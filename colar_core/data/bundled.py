"""The real data sets shipped inside the package, by name, so a run needs no network.

The files lie under ``colar_core/data/sets/<set>/`` next to a ``SOURCE.md`` that names where each
came from, at which commit, and under which license. A bundled name is accepted wherever a data
source is (``read_records``, ``prepare_data``, ``colar data prepare --input``, ``data.source``,
``eval.datasets``); an existing local file or folder of the same name is read instead (write
``./svamp`` for a local one, the same rule the stage keys use).

======================  ==========================  ============  =======  ====================
name                    file                        format        records  use
======================  ==========================  ============  =======  ====================
``gsm8k-train``         gsm8k/train.jsonl           gsm8k         7,473    training (GSM8K)
``gsm8k-test``          gsm8k/test.jsonl            gsm8k         1,319    evaluation
``gsm8k-aug-valid``     gsm8k_aug/valid.txt         gsm8k-aug     500      validation
``gsm8k-aug-test``      gsm8k_aug/test.txt          gsm8k-aug     1,319    evaluation
``gsm-hard``            gsm_hard/gsmhardv2.jsonl    gsm-hard      1,319    evaluation only
``svamp``               svamp/SVAMP.json            svamp         1,000    evaluation only
``multiarith``          multiarith/MultiArith.json  multiarith    600      evaluation only
======================  ==========================  ============  =======  ====================

The three evaluation-only sets have no checkable equation steps: their records have ``steps=()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BundledSet", "BUNDLED", "SETS_DIR", "bundled_names", "resolve_bundled"]

#: Folder of the bundled files (package data, see ``[tool.setuptools.package-data]``).
SETS_DIR = Path(__file__).resolve().parent / "sets"


@dataclass(frozen=True)
class BundledSet:
    """One bundled set: its file (relative to :data:`SETS_DIR`), reader format and record count."""

    name: str
    file: str
    format: str
    records: int
    evaluation_only: bool = False

    @property
    def path(self) -> Path:
        return SETS_DIR / self.file

    @property
    def source_md(self) -> Path:
        """The ``SOURCE.md`` (origin, commit, license) next to the file."""
        return self.path.parent / "SOURCE.md"


BUNDLED: dict[str, BundledSet] = {s.name: s for s in (
    BundledSet("gsm8k-train", "gsm8k/train.jsonl", "gsm8k", 7473),
    BundledSet("gsm8k-test", "gsm8k/test.jsonl", "gsm8k", 1319),
    BundledSet("gsm8k-aug-valid", "gsm8k_aug/valid.txt", "gsm8k-aug", 500),
    BundledSet("gsm8k-aug-test", "gsm8k_aug/test.txt", "gsm8k-aug", 1319),
    BundledSet("gsm-hard", "gsm_hard/gsmhardv2.jsonl", "gsm-hard", 1319, evaluation_only=True),
    BundledSet("svamp", "svamp/SVAMP.json", "svamp", 1000, evaluation_only=True),
    BundledSet("multiarith", "multiarith/MultiArith.json", "multiarith", 600, evaluation_only=True),
)}


def bundled_names() -> list[str]:
    """The bundled set names, in table order."""
    return list(BUNDLED)


def resolve_bundled(source: str) -> tuple[str, str] | None:
    """``(file path, format)`` of the bundled set named ``source``, or ``None`` if it names none or an
    existing local path of that name wins (the rule of every reader, key and check here).

    Only the exact name counts (``"svamp"``, not ``"SVAMP"`` or ``"./svamp"``).
    """
    found = BUNDLED.get(str(source)) if isinstance(source, (str, Path)) else None
    if found is not None and os.path.exists(source):
        return None
    return (str(found.path), found.format) if found is not None else None
