"""Configs as MLflow params, and the secret masking that every param, tag and run name goes through.

:func:`flatten_params` turns a nested config (dicts, pydantic models, dataclasses) into MLflow's
flat ``{"a.b.c": "value"}``; :func:`mask_secrets` hides credentials in a single value. Both mask
the same things: keys naming a credential (:func:`is_secret_key`), values of environment variables
named like a secret, and credentials embedded in URLs (the whole userinfo).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

__all__ = ["MASK", "MAX_KEY", "MAX_PARAM_VALUE", "flatten_params", "is_secret_key", "mask_secrets", "mask_url",
           "masked_tags"]

MASK = "***"

# MLflow limits (mlflow.utils.validation): a param value holds 6000 characters, a key 250.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250

# Words (of a key split on "_", "-", "." and camelCase) that mark a secret.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "key")}
# "pad_token", "eos_token_id", "latent_token" ... name vocabulary entries, not credentials.
_VOCAB_TOKEN_ROLES = {
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "latent", "start", "end", "stop",
    "think", "answer", "bot", "eot", "thought", "step", "sentinel", "additional", "chat",
}
# Env var names whose values are treated as secrets when they appear in a param value.
_SECRET_ENV_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY", re.IGNORECASE)
# Env values shorter than this are masked only where a param equals them exactly ("1", "true"
# would otherwise be cut out of every value); longer ones wherever they occur in a value.
_MIN_SECRET_SUBSTRING = 8
_MIN_SECRET_EXACT = 6
# The userinfo of a URL (``scheme://USERINFO@host``): everything between "://" and the last "@"
# before the authority ends at "/", "?", "#" or a space (so a raw "@" in a password is masked too).
_URL_USERINFO = re.compile(r"([A-Za-z][\w+.-]*://)([^/?#\s]*)@")


def _mask_userinfo(match: re.Match) -> str:
    user, sep, _ = match.group(2).partition(":")
    kept = f"{user}:{MASK}" if sep and user else MASK
    return f"{match.group(1)}{kept}@"


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``https://user:***@host`` when there
    is a username and a password, ``https://***@host`` for a bare token (``https://tok@host``,
    ``https://:tok@host``)."""
    return _URL_USERINFO.sub(_mask_userinfo, text)


def _key_words(key: str) -> list[str]:
    key = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True if the last segment of a dotted key names a credential (``hf_token``, ``api_key``...).

    Matching is by word, not substring: ``max_new_tokens``, ``tokenizer`` and ``pad_token_id`` are
    ordinary parameters; ``token``, ``hf_token``, ``HF_TOKEN``, ``openai_api_key``, ``db_password``,
    ``client_secret`` are secrets.
    """
    words = _key_words(key.rsplit(".", 1)[-1])
    for i, w in enumerate(words):
        if w == "token":
            before = words[i - 1] if i > 0 else ""
            after = words[i + 1] if i + 1 < len(words) else ""
            if before in _VOCAB_TOKEN_ROLES or after in {"id", "ids", "str", "index"}:
                continue
            return True
        if w in _SECRET_WORDS:
            return True
        if i > 0 and (words[i - 1], w) in _SECRET_PAIRS:
            return True
    return False


def _secret_env_values() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_SECRET_EXACT}
    return sorted(values, key=len, reverse=True)


def _mask_value(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if text == s:
            return MASK
        if len(s) >= _MIN_SECRET_SUBSTRING and s in text:
            text = text.replace(s, MASK)
    return mask_url(text)


def mask_secrets(text: Any) -> str:
    """``text`` (stringified) with secret environment values and URL credentials replaced by ``***``:
    the masking of :func:`flatten_params`, for run names, tags and log lines."""
    return _mask_value(_stringify(text), _secret_env_values())


def masked_tags(tags: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """Tags as strings, secrets masked (a tag value is as visible as a param); None values dropped."""
    secrets = _secret_env_values()
    return {str(k): _mask_value(_stringify(v), secrets) for k, v in (tags or {}).items() if v is not None}


def _to_plain(value: Any) -> Any:
    """Config objects (pydantic, dataclasses) to dicts; everything else unchanged."""
    if hasattr(value, "model_dump") and callable(value.model_dump):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def flatten_params(nested: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into MLflow params: ``{"a.b.c": "value"}``.

    - dicts, pydantic models and dataclasses recurse with dotted keys;
    - lists/tuples of scalars are joined with ``","``; lists holding dicts recurse as ``key.0.x``;
    - values are stringified and cut to MLflow's 6000-character limit (keys to 250);
    - secrets are masked with ``***``: keys naming a credential (see :func:`is_secret_key`), any
      occurrence of the value of an environment variable whose name contains
      TOKEN/PASSWORD/SECRET/KEY, and credentials embedded in URLs (:func:`mask_url`).
    """
    secrets = _secret_env_values()
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
            value = ",".join(_stringify(v) for v in items)
        if not key:
            key = "value"
        if is_secret_key(key):
            text = MASK
        else:
            text = _mask_value(_stringify(value), secrets)
        out[key[:MAX_KEY]] = text[:MAX_PARAM_VALUE]

    walk(nested, prefix.rstrip("."))
    return out
