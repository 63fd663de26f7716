"""The small record a finished training stage leaves behind (``output_dir/result.json``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

RESULT_FILE = "result.json"
_PATH_FIELDS = ("model_dir", "metrics_path", "best_model_dir", "output_dir")


class StageResultMixin:
    """JSON round trip for a stage-result dataclass whose path fields are ``Path`` objects."""

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: (Path(v) if k in _PATH_FIELDS and v is not None else v) for k, v in d.items()
                      if k in cls.__dataclass_fields__})

    @classmethod
    def load(cls, output_dir):
        return cls.from_dict(json.loads((Path(output_dir) / RESULT_FILE).read_text()))

    def save(self, output_dir) -> Path:
        path = Path(output_dir) / RESULT_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path
