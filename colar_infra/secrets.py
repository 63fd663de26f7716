"""Secret masking: what every param, tag, run name, log line and printed URL goes through.

:func:`mask_secrets` hides credentials in one value, :func:`masked_tags` in a set of run tags and
:func:`mask_url` in the URLs of a text; :func:`colar_infra.tracking.params.flatten_params` masks a whole
config with :func:`masker` and :func:`is_secret_key`. They mask the same things: keys naming a credential
(:func:`is_secret_key`), values of environment variables named like a secret, and credentials embedded in
URLs (the whole userinfo, and query parameters named like a secret: ``?password=``, which libpq reads).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

__all__ = ["MASK", "is_secret_key", "mask_secrets", "mask_url", "masked_tags", "masker", "to_text"]

MASK = "***"

# Words (of a key split on "_", "-", "." and camelCase) that mark a secret.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "key"),
                 ("auth", "string")}
# "pad_token", "eos_token_id", "latent_token" ... name vocabulary entries, not credentials.
_VOCAB_TOKEN_ROLES = {
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "latent", "start", "end", "stop",
    "think", "answer", "bot", "eot", "thought", "step", "sentinel", "additional", "chat",
}
# Env var names whose values are treated as secrets when they appear in a value (AUTH_STRING: Prefect's
# API auth string, PREFECT_API_AUTH_STRING / PREFECT_SERVER_API_AUTH_STRING).
_SECRET_ENV_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY|AUTH_STRING", re.IGNORECASE)
# Env values shorter than this are masked only where a value equals them exactly ("1", "true"
# would otherwise be cut out of every value); longer ones wherever they occur in a value.
_MIN_SECRET_SUBSTRING = 8
_MIN_SECRET_EXACT = 6
# The userinfo of a URL (``scheme://USERINFO@host``): everything between "://" and the last "@"
# before the authority ends at "/", "?", "#" or a space (so a raw "@" in a password is masked too).
_URL_USERINFO = re.compile(r"([A-Za-z][\w+.-]*://)([^/?#\s]*)@")
# A query parameter (``?name=value`` or ``&name=value``): the value ends at the next "&", "#", white
# space or quote (a URL quoted in JSON or a log line ends there).
_QUERY_PARAM = re.compile(r"([?&])([^=&#?\s\"']+)=([^&#\s\"']*)")
# Parameter names that carry a secret beyond :func:`is_secret_key`'s words: libpq's ``sslpassword``.
_SECRET_PARAM_ENDINGS = ("password", "passwd")


def _mask_userinfo(match: re.Match) -> str:
    user, sep, _ = match.group(2).partition(":")
    kept = f"{user}:{MASK}" if sep and user else MASK
    return f"{match.group(1)}{kept}@"


def _mask_query_param(match: re.Match) -> str:
    name = urllib.parse.unquote(match.group(2))  # libpq reads `pass%77ord=` as `password=`
    if match.group(3) and (is_secret_key(name) or name.lower().endswith(_SECRET_PARAM_ENDINGS)):
        return f"{match.group(1)}{match.group(2)}={MASK}"
    return match.group(0)


def mask_url(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: the userinfo (``https://user:***@host``
    when there is a username and a password, ``https://***@host`` for a bare token: ``https://tok@host``,
    ``https://:tok@host``) and the value of every query parameter named like a secret (``?password=***``,
    libpq's way of giving a password; ``&token=***``, ``?api_key=***``; :func:`is_secret_key`)."""
    return _QUERY_PARAM.sub(_mask_query_param, _URL_USERINFO.sub(_mask_userinfo, text))


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


def masker() -> Callable[[str], str]:
    """The masking of one text for the secrets of the environment as it is now (read once, so a config
    of many values reads the environment once): secret environment values (whole, or inside the text
    when they are long enough) and URL credentials replaced by ``***``."""
    secrets = _secret_env_values()

    def mask(text: str) -> str:
        for s in secrets:
            if text == s:
                return MASK
            if len(s) >= _MIN_SECRET_SUBSTRING and s in text:
                text = text.replace(s, MASK)
        return mask_url(text)

    return mask


def to_text(value: Any) -> str:
    """``value`` as the text MLflow gets (a param, tag or run name) and masking reads: strings as they
    are, paths as their string, whole floats as ``repr`` (``2.0``), anything else through ``str``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


def mask_secrets(text: Any) -> str:
    """``text`` (:func:`to_text`) with secret environment values and URL credentials replaced by ``***``:
    the masking of :func:`~colar_infra.tracking.params.flatten_params`, for run names, tags and log lines."""
    return masker()(to_text(text))


def masked_tags(tags: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """Tags as strings, secrets masked (a tag value is as visible as a param); None values dropped."""
    mask = masker()
    return {str(k): mask(to_text(v)) for k, v in (tags or {}).items() if v is not None}
