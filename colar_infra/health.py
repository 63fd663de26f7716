"""Does an HTTP server answer? One probe for the local servers (started and healthy: 2xx only) and for the
tracking server seen from a stage (there at all: any HTTP status, a 401 included)."""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

PROBE_TIMEOUT_S = 2.0  # how long a probe waits before the server counts as away


def health_url(base: str, path: str = "health") -> Optional[str]:
    """``<base>/<path>`` without credentials for an http(s) URL; None for any other store (a ``sqlite:``
    or ``file:`` tracking URI has no server to ask)."""
    if not base.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(base)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/" + path.lstrip("/"), "", ""))


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S, *, ok_only: bool = False) -> bool:
    """Whether an HTTP server answers ``url`` within ``timeout_s``. Any HTTP status counts as an answer
    (it is there), unless ``ok_only``: then only a 2xx does (it is up and healthy)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - our own servers
            return not ok_only or 200 <= resp.status < 300
    except urllib.error.HTTPError:  # it answered (401, 404...): there, not healthy
        return not ok_only
    except (urllib.error.URLError, OSError, ValueError):
        return False
