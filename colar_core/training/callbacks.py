"""Metrics callbacks: how a training loop reports, without the core knowing about trackers.

A callback is any object with some of these methods (all optional; rank 0 only calls them)::

    on_train_start(info)          info: step (0 or the resumed step), max_steps, resumed_from, world_size
    on_step(step, metrics)        per-step (or per log_every window) loss parts, lr, grad_norm, tokens_per_s, r
    on_eval(step, metrics)        validation: score, accuracy / mean #L per compression factor
    on_checkpoint(step, path)     a complete resumable checkpoint was written
    on_train_end(info)            step, best_score, stopped_early

Built-ins: :class:`JsonlLogger` (``metrics.jsonl`` in the output directory) and
:class:`ConsoleLogger` (a one-line progress print, silent under CI or without a TTY). An MLflow
callback lives in the pipeline, not here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, runtime_checkable


@runtime_checkable
class Callback(Protocol):
    def on_step(self, step: int, metrics: dict) -> None: ...
    def on_eval(self, step: int, metrics: dict) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...


class CallbackBase:
    """No-op implementations; subclass and override what you need."""

    def on_train_start(self, info: dict) -> None:
        pass

    def on_step(self, step: int, metrics: dict) -> None:
        pass

    def on_eval(self, step: int, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_train_end(self, info: dict) -> None:
        pass


class CallbackList:
    """Fans each event out to the callbacks that implement it."""

    def __init__(self, callbacks: Optional[Iterable[Any]] = None):
        self.callbacks = list(callbacks or [])

    def _call(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(*args)

    def on_train_start(self, info: dict) -> None:
        self._call("on_train_start", info)

    def on_step(self, step: int, metrics: dict) -> None:
        self._call("on_step", step, metrics)

    def on_eval(self, step: int, metrics: dict) -> None:
        self._call("on_eval", step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._call("on_checkpoint", step, path)

    def on_train_end(self, info: dict) -> None:
        self._call("on_train_end", info)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


class JsonlLogger(CallbackBase):
    """Appends one JSON object per event to ``path`` (``metrics.jsonl``).

    Records: ``{"event": "step"|"eval"|"checkpoint"|"start"|"end", "step": N, ..., "time": unix}``.
    On a resumed start, records of steps after the resumed step (written by the killed run after its
    last checkpoint, and about to be redone) are dropped, so the history reads as one run; the
    ``start`` records of both runs are kept (``resumed_from`` says where the second one began).
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        record = _clean(dict(record, time=time.time()))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def on_train_start(self, info: dict) -> None:
        resumed = info.get("resumed_from")
        keep = []
        if resumed is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("event") == "start" or rec.get("step", 0) <= resumed:
                    keep.append(json.dumps(rec))
        # a fresh run (no checkpoint to resume) starts a fresh history
        self.path.write_text("".join(k + "\n" for k in keep))
        self._write({"event": "start", **info})

    def on_step(self, step: int, metrics: dict) -> None:
        self._write({"event": "step", "step": step, **metrics})

    def on_eval(self, step: int, metrics: dict) -> None:
        self._write({"event": "eval", "step": step, **metrics})

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._write({"event": "checkpoint", "step": step, "path": str(path)})

    def on_train_end(self, info: dict) -> None:
        self._write({"event": "end", **info})


def read_metrics(path, event: Optional[str] = None) -> list[dict]:
    """Records of a ``metrics.jsonl`` (only those of ``event`` if given); cut lines are skipped."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out


def console_is_quiet(stream=None) -> bool:
    """Quiet under CI (the ``CI`` variable is set) or when the stream is not a terminal."""
    stream = stream or sys.stderr
    if os.environ.get("CI"):
        return True
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


class ConsoleLogger(CallbackBase):
    """A short progress line per ``every`` steps and one per evaluation.

    ``quiet=None`` decides from the environment (see :func:`console_is_quiet`); quiet prints nothing.
    """

    def __init__(self, every: int = 10, quiet: Optional[bool] = None, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = console_is_quiet(self.stream) if quiet is None else quiet
        self.every = max(1, every)
        self.max_steps: Optional[int] = None
        self._t0 = time.time()

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def on_train_start(self, info: dict) -> None:
        self.max_steps = info.get("max_steps")
        self._t0 = time.time()
        resumed = info.get("resumed_from")
        self._print(f"[train] {'resuming at step ' + str(resumed) if resumed is not None else 'starting'}"
                    f" / {self.max_steps} steps, {info.get('world_size', 1)} process(es)")

    def on_step(self, step: int, metrics: dict) -> None:
        if step % self.every and step != self.max_steps:
            return
        parts = [f"loss {metrics.get('loss', float('nan')):.4f}"]
        for k in ("ce", "latent", "reward_mean", "accuracy", "mean_latents"):
            if k in metrics:
                parts.append(f"{k} {metrics[k]:.4f}")
        if "r" in metrics:
            parts.append(f"r {metrics['r']:.0f}")
        parts.append(f"lr {metrics.get('lr', 0):.2e}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
        self._print(f"[train] step {step}/{self.max_steps} " + " | ".join(parts))

    def on_eval(self, step: int, metrics: dict) -> None:
        shown = {k: v for k, v in metrics.items() if k.startswith(("acc", "mean_", "score"))}
        self._print(f"[eval] step {step} " + " ".join(f"{k}={v:.3f}" for k, v in shown.items()
                                                      if isinstance(v, (int, float))))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._print(f"[ckpt] step {step} -> {path}")

    def on_train_end(self, info: dict) -> None:
        self._print(f"[train] done at step {info.get('step')} in {time.time() - self._t0:.0f}s"
                    + (" (early stop)" if info.get("stopped_early") else ""))
