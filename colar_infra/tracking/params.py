"""Configs as MLflow params, and MLflow's limits on what one call may carry.

:func:`flatten_params` turns a nested config (dicts, pydantic models, dataclasses) into MLflow's
flat ``{"a.b.c": "value"}``, credentials masked (:mod:`colar_infra.secrets`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from colar_infra.secrets import MASK, is_secret_key, masker, to_text

__all__ = ["MAX_ENTITIES_PER_BATCH", "MAX_KEY", "MAX_METRICS_PER_BATCH", "MAX_PARAMS_PER_BATCH", "MAX_PARAM_VALUE",
           "flatten_params"]

# MLflow limits (mlflow.utils.validation): a param value holds 6000 characters, a key 250; one log_batch
# call carries at most 1000 metrics, 100 params (and 100 tags), 1000 entities in all (metrics + params + tags).
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000


def _to_plain(value: Any) -> Any:
    """Config objects (pydantic, dataclasses) to dicts; everything else unchanged."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def flatten_params(nested: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a.b.c": "value"}``.

    - dicts, pydantic models and dataclasses recurse with dotted keys;
    - lists/tuples of scalars are joined with ``","``; lists holding dicts recurse as ``key.0.x``;
    - values are stringified and cut to MLflow's 6000-character limit (keys to 250);
    - secrets are masked with ``***``: keys naming a credential (see :func:`~colar_infra.secrets.is_secret_key`), any
      occurrence of the value of an environment variable whose name contains
      TOKEN/PASSWORD/SECRET/KEY, and credentials embedded in URLs (:mod:`colar_infra.secrets`).
    """
    mask = masker()
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        value = _to_plain(value)
        if isinstance(value, Mapping):
            if not value and key:
                out[key] = "{}"
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            items = [_to_plain(v) for v in value]
            if any(isinstance(v, (Mapping, list, tuple)) for v in items):
                for i, v in enumerate(items):
                    walk(v, f"{key}.{i}")
                return
            if isinstance(value, (set, frozenset)):
                items = sorted(items, key=str)
            value = ",".join(to_text(v) for v in items)
        if not key:
            key = "value"
        if is_secret_key(key):
            text = MASK
        else:
            text = mask(to_text(value))
        out[key[:MAX_KEY]] = text[:MAX_PARAM_VALUE]

    walk(nested, prefix.rstrip("."))
    return out
