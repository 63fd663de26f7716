"""The colar home: where the local servers keep their state and a run keeps what MLflow has not received
yet. ``$COLAR_HOME`` if set, else ``./.colar`` under the current folder.

A home has an identity, :func:`home_id`: a random id written once to ``<home>/home-id``. It tells two
homes apart where their paths cannot (the same path on two hosts, a home deleted and made anew, whose
artifacts are gone) and stays with a home that is moved. Backend postgres records it as the owner of a
database prefix (:func:`colar_infra.backends.ensure_databases`)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import tempfile
from pathlib import Path

from colar_core.files import fsync_dir

__all__ = ["HOME_ID_FILE", "colar_home", "home_id", "home_place"]

#: The file in a colar home that holds its id.
HOME_ID_FILE = "home-id"
_HOME_ID = re.compile(r"[0-9a-f]{32}")


def colar_home() -> Path:
    """``$COLAR_HOME`` (``~`` expanded) if set, else ``./.colar`` under the current folder (not created)."""
    env = os.environ.get("COLAR_HOME")
    return Path(env).expanduser() if env else Path.cwd() / ".colar"


def home_id(home: Path) -> str:
    """The id of the colar home ``home`` (an existing folder): 32 hex digits from ``home/home-id``, written
    there (mode 0600) the first time it is asked for. Two processes asking at once get the same id (the
    file is linked into place only if it is not there yet). A file that holds anything else is a
    :class:`ValueError` naming it: replacing it would give the home another identity."""
    path = Path(home) / HOME_ID_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=home, prefix=f".{HOME_ID_FILE}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(16) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first: its id stands
                os.link(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        fsync_dir(home)
    text = path.read_text().strip()
    if not _HOME_ID.fullmatch(text):
        raise ValueError(f"{path} does not hold a colar home id (32 hex digits); it names this home as the owner "
                         "of its databases: restore it, or delete it to give the home a new identity")
    return text


def home_place(home: Path) -> str:
    """``host:path`` of ``home``, for messages and owner records."""
    return f"{socket.gethostname()}:{Path(home).resolve()}"
