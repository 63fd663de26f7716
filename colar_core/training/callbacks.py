"""Metrics callbacks: how a training loop reports, without the core knowing about trackers.

A callback is any object with some of these methods (all optional; rank 0 only calls them)::

    on_train_start(info)          info: step (0 or the resumed step), max_steps, resumed_from, world_size
    on_step(step, metrics)        per-step (or per log_every window) loss parts, lr, grad_norm, tokens_per_s, r
    on_eval(step, metrics)        validation: score, accuracy / mean #L per compression factor
    on_checkpoint(step, path)     a complete resumable checkpoint was written
    on_train_end(info)            step, best_score, stopped_early

Built-ins: :class:`JsonlLogger` (``metrics.jsonl`` in the output directory) and
:class:`ConsoleLogger` (about twenty progress lines per run with elapsed time and ETA; silent under
CI or without a TTY unless ``COLAR_PROGRESS=1``; or sent to any ``sink`` such as a logger). An
MLflow callback lives in the pipeline, not here.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from colar_core.files import atomic_write_text

PROGRESS_ENV = "COLAR_PROGRESS"  # "1": progress lines even without a terminal (a log, a launcher pipe); "0": none


class Callback(Protocol):
    """The events a training loop reports. Each method is optional at run time (the loop calls only
    those an object has); :class:`CallbackBase` implements them all as no-ops."""

    def on_train_start(self, info: dict) -> None: ...
    def on_step(self, step: int, metrics: dict) -> None: ...
    def on_eval(self, step: int, metrics: dict) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_train_end(self, info: dict) -> None: ...


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
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))  # a kill here keeps the old history
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
    out: list[dict] = []
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
    """``COLAR_PROGRESS`` = 1 / 0 decides when set; else quiet under CI (``CI`` set) or off a terminal."""
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "0"
    stream = stream or sys.stderr
    if os.environ.get("CI"):
        return True
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ConsoleLogger(CallbackBase):
    """A short progress line every ``every`` steps (default: about twenty per run) and one per evaluation.

    Lines go to ``sink`` when given (e.g. a logger's ``info``), else to ``stream`` (stderr).
    ``quiet=None`` decides from the environment (see :func:`console_is_quiet`; never quiet with a
    sink); quiet prints nothing.
    """

    def __init__(self, every: Optional[int] = None, quiet: Optional[bool] = None, stream=None,
                 sink: Optional[Callable[[str], None]] = None):
        self.stream = stream or sys.stderr
        self.sink = sink
        if quiet is None:
            quiet = False if sink is not None else console_is_quiet(self.stream)
        self.quiet = quiet
        self._every = every
        self.every = max(1, every or 10)
        self.max_steps: Optional[int] = None
        self._t0 = time.time()
        self._first_step: Optional[int] = None

    def _print(self, text: str) -> None:
        if self.quiet:
            return
        if self.sink is not None:
            self.sink(text)
        else:
            print(text, file=self.stream, flush=True)

    def on_train_start(self, info: dict) -> None:
        self.max_steps = info.get("max_steps")
        if self._every is None and self.max_steps:
            self.every = max(1, self.max_steps // 20)
        self._t0 = time.time()
        self._first_step = info.get("step") or 0
        resumed = info.get("resumed_from")
        self._print(f"[train] {'resuming at step ' + str(resumed) if resumed is not None else 'starting'}"
                    f" / {self.max_steps} steps, {info.get('world_size', 1)} process(es)")

    def _timing(self, step: int) -> str:
        elapsed = time.time() - self._t0
        done = step - (self._first_step or 0)
        text = _duration(elapsed)
        if self.max_steps and done > 0 and step < self.max_steps:
            text += f", ETA {_duration(elapsed / done * (self.max_steps - step))}"
        return text

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
        parts.append(self._timing(step))
        self._print(f"[train] step {step}/{self.max_steps} " + " | ".join(parts))

    def on_eval(self, step: int, metrics: dict) -> None:
        shown = {k: v for k, v in metrics.items() if k.startswith(("acc", "mean_", "score"))}
        self._print(f"[eval] step {step} " + " ".join(f"{k}={v:.3f}" for k, v in shown.items()
                                                      if isinstance(v, (int, float))))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._print(f"[ckpt] step {step} -> {path}")

    def on_train_end(self, info: dict) -> None:
        self._print(f"[train] done at step {info.get('step')} in {_duration(time.time() - self._t0)}"
                    + (" (early stop)" if info.get("stopped_early") else ""))


def stage_callbacks(metrics_path: Path, callbacks: Sequence = ()) -> list:
    """What a training stage reports to: ``metrics.jsonl``, console progress, then the caller's
    callbacks. A :class:`ConsoleLogger` among the caller's replaces the default one (so a pipeline
    can send progress to its own log without printing it twice)."""
    extra = list(callbacks)
    console = [] if any(isinstance(c, ConsoleLogger) for c in extra) else [ConsoleLogger()]
    return [JsonlLogger(metrics_path), *console, *extra]
