"""The one in-memory form of a reasoning problem, and the error every reader raises.

A :class:`Record` is what the rest of ``colar_core`` consumes: a question, its chain of
equation steps (GSM8k-Aug style, e.g. ``"16-3-4=9"``, without ``<< >>``) and the final answer.
:class:`DataError` carries *where* a bad input is (file or dataset, line or row, field) so a
user can fix the file instead of guessing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Record:
    """One problem: ``question``, equation ``steps`` (joined by ``"\\n"`` for training), ``answer``."""

    id: str
    question: str
    steps: tuple[str, ...]
    answer: str

    def to_dict(self) -> dict:
        """JSON-ready dict with ``steps`` as a list (the on-disk JSONL form)."""
        return {"id": self.id, "question": self.question, "steps": list(self.steps), "answer": self.answer}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Record":
        """Inverse of :meth:`to_dict`; a missing ``id`` becomes ``""``. No validation here
        (readers validate, because only they know the file and line to blame)."""
        return cls(
            id=str(d.get("id", "")),
            question=str(d["question"]),
            steps=tuple(str(s) for s in d["steps"]),
            answer=str(d["answer"]),
        )


class DataError(ValueError):
    """A bad input record, located precisely.

    ``source`` is a file path or dataset id, ``line`` a 1-based line number (or ``"row N"`` for a
    dataset row, or ``None``), ``field`` the offending field (``"steps[2]"``, ``"answer"``,
    ``"json"`` ...), ``reason`` what is wrong. ``str(err)`` is ``"{source}:{line}: field '{field}': {reason}"``.
    """

    def __init__(self, source: str, line: int | str | None, field: str | None, reason: str):
        self.source = str(source)
        self.line = line
        self.field = field
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        if self.field is None:
            return f"{where}: {self.reason}"
        return f"{where}: field '{self.field}': {self.reason}"

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):  # keep pickling (e.g. across worker processes) working
        return (type(self), (self.source, self.line, self.field, self.reason))
