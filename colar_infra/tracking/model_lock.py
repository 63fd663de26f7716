"""A mutex on a registered model, in the tracking server's own terms, for read-decide-move sequences
on its aliases (the promotion gate: read who holds ``candidate``, compare, move it).

MLflow has no compare-and-set on an alias, but creating a registered model is atomic: the server
answers ``RESOURCE_ALREADY_EXISTS`` to the second of two creations of one name. So the lock on model
``M`` is a registered model named ``M.colar-promotion-lock`` (:func:`lock_name`): taking it is creating
that model (tags ``colar.lock.owner``: who asked, e.g. the pipeline run; ``colar.lock.holder``:
host:pid; ``colar.lock.token``: this holder's random token; ``colar.lock.acquired_at``: Unix time),
releasing it is deleting it. Every process that talks to the same server sees the same lock, whatever
machine it runs on. It shows in the registry only while held.

- Waiting: another holder's lock is polled every ``poll_s`` (with jitter) for up to ``timeout_s``,
  then :class:`ModelLockTimeout` names the holder, since when, and how to clear it.
- Staleness: a holder that died (SIGKILL, lost machine) leaves its lock. A lock older than
  ``stale_after_s`` (by its ``acquired_at`` tag, else the server's creation time) is broken with a
  warning: deleted, if it is still the same lock (same token) when read again, then taken as usual.
  Ages compare the waiter's clock with the holder's, so machines' clocks must agree well within
  ``stale_after_s``. Two waiters that break the same stale lock in the same instant could both
  delete (the second deleting the first one's new lock): MLflow has no conditional delete. The window
  is one request wide and needs a dead holder, and the holder checks that it still holds the lock
  right before it acts (:meth:`ModelLock.check`).
- Release: the lock is deleted only while it still carries this holder's token (a lock broken as
  stale and taken by another is left to that one, with a warning). Ctrl-C inside the block releases it
  (the ``with`` block's exit runs); a SIGKILL leaves it to go stale.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

__all__ = ["LOCK_SUFFIX", "ModelLock", "ModelLockLost", "ModelLockTimeout", "lock_name", "model_lock"]

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".colar-promotion-lock"
#: How long a waiter waits for another holder, and after how long a lock counts as left by a dead
#: holder. A decision under the lock takes a few requests (seconds); the wait outlasts the stale age,
#: so a waiter behind a dead holder breaks its lock instead of giving up.
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_STALE_AFTER_S = 300.0
DEFAULT_POLL_S = 0.5

_OWNER, _HOLDER, _TOKEN, _ACQUIRED = "colar.lock.owner", "colar.lock.holder", "colar.lock.token", "colar.lock.acquired_at"


class ModelLockTimeout(TimeoutError):
    """Another holder kept the lock for longer than the wait allowed."""


class ModelLockLost(RuntimeError):
    """The lock this holder took is no longer its own (broken as stale, or deleted by hand)."""


def lock_name(model_name: str) -> str:
    """The registered model that is the lock on ``model_name``."""
    return f"{model_name}{LOCK_SUFFIX}"


def _code(err: MlflowException) -> str:
    return str(getattr(err, "error_code", ""))


def _read(client: MlflowClient, name: str) -> Optional[RegisteredModel]:
    """The lock model, None when there is none."""
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if _code(err) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _tags(model: RegisteredModel) -> dict[str, str]:
    return dict(model.tags or {})


def _acquired_at(model: RegisteredModel) -> float:
    """When the lock was taken (Unix seconds): its tag, else the server's creation time."""
    try:
        return float(_tags(model)[_ACQUIRED])
    except (KeyError, ValueError):
        return (model.creation_timestamp or 0) / 1000.0


def _describe(model: RegisteredModel) -> str:
    tags = _tags(model)
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_acquired_at(model)))
    return (f"held by {tags.get(_OWNER, '?')} ({tags.get(_HOLDER, '?')}) since {since}, "
            f"{time.time() - _acquired_at(model):.0f} s ago")


@dataclass(frozen=True)
class ModelLock:
    """A lock this process holds (what :func:`model_lock` yields)."""

    client: MlflowClient
    name: str
    token: str
    owner: str

    def held(self) -> bool:
        """Whether the lock model still exists and carries this holder's token."""
        model = _read(self.client, self.name)
        return model is not None and _tags(model).get(_TOKEN) == self.token

    def check(self) -> None:
        """Raise :class:`ModelLockLost` unless this holder still holds the lock (call it right before
        acting on what was read under the lock)."""
        if not self.held():
            raise ModelLockLost(f"lost the lock {self.name} (broken as stale or deleted by hand) before acting "
                                "on what was read under it: nothing was changed")


def _acquire(client: MlflowClient, name: str, owner: str, token: str, timeout_s: float, stale_after_s: float,
             poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    holder = f"{socket.gethostname()}:{os.getpid()}"
    description = (f"Lock held by colar while it decides whether to move an alias of "
                   f"{name.removesuffix(LOCK_SUFFIX)}; deleted when done (colar_infra.tracking.model_lock). "
                   f"A lock older than {stale_after_s:.0f} s is taken as left by a dead holder.")
    while True:
        try:
            client.create_registered_model(name, tags={_OWNER: owner, _HOLDER: holder, _TOKEN: token,
                                                       _ACQUIRED: f"{time.time():.3f}"}, description=description)
            return
        except MlflowException as err:
            if _code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
        current = _read(client, name)
        if current is None:
            continue  # released between our create and our read: try again at once
        if _tags(current).get(_TOKEN) == token:
            return  # our own create: the client resent it after a lost answer
        if time.time() - _acquired_at(current) > stale_after_s:
            again = _read(client, name)  # still that same lock? (another waiter may have broken it already)
            if again is None or _tags(again).get(_TOKEN) != _tags(current).get(_TOKEN):
                continue
            log.warning("breaking stale lock %s (%s; stale after %.0f s)", name, _describe(current), stale_after_s)
            try:
                client.delete_registered_model(name)
                continue
            except MlflowException as err:
                if _code(err) == "RESOURCE_DOES_NOT_EXIST":
                    continue  # gone meanwhile: fine
                log.warning("could not break the stale lock %s: %s", name, err)  # e.g. no permission: wait on
        if time.monotonic() >= deadline:
            raise ModelLockTimeout(
                f"waited {timeout_s:.0f} s for the lock {name}: {_describe(current)}. A lock left by a dead "
                f"process is broken once older than {stale_after_s:.0f} s; to clear it now, delete the "
                f"registered model {name!r} (MLflow UI, or MlflowClient().delete_registered_model)")
        time.sleep(poll_s * random.uniform(0.5, 1.5))


def _release(client: MlflowClient, name: str, token: str) -> None:
    try:
        current = _read(client, name)
        if current is None or _tags(current).get(_TOKEN) != token:
            log.warning("lock %s was no longer this holder's when released (broken as stale or deleted by hand); "
                        "left as it is", name)
            return
        client.delete_registered_model(name)
    except MlflowException as err:
        log.warning("could not release the lock %s (%s); it is broken once stale", name, err)


@contextlib.contextmanager
def model_lock(client: MlflowClient, model_name: str, *, owner: str, timeout_s: float = DEFAULT_TIMEOUT_S,
               stale_after_s: float = DEFAULT_STALE_AFTER_S, poll_s: float = DEFAULT_POLL_S) -> Iterator[ModelLock]:
    """``with model_lock(client, "colar-tiny", owner=run_id) as lock:`` hold the lock on the registered
    model ``model_name`` for the block (module docstring); ``owner`` says who holds it (a run id).
    Raises :class:`ModelLockTimeout` after ``timeout_s`` behind another holder."""
    name = lock_name(model_name)
    token = uuid.uuid4().hex
    _acquire(client, name, owner, token, timeout_s, stale_after_s, poll_s)
    try:
        yield ModelLock(client, name, token, owner)
    finally:
        _release(client, name, token)
