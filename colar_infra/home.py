"""The colar home: where the local servers keep their state and a run keeps what MLflow has not received
yet. ``$COLAR_HOME`` if set, else ``./.colar`` under the current folder."""

from __future__ import annotations

import os
from pathlib import Path


def colar_home() -> Path:
    """``$COLAR_HOME`` (``~`` expanded) if set, else ``./.colar`` under the current folder (not created)."""
    env = os.environ.get("COLAR_HOME")
    return Path(env).expanduser() if env else Path.cwd() / ".colar"
