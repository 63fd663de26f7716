"""MLflow "model from code": a pyfunc whose predict runs CoLaR latent reasoning.

Logged by path (no pickled Python objects). Input: a DataFrame with a ``question`` column (or a
list of strings). Params: ``compression_factor`` (the speed, default 2), ``seed``,
``max_latents`` (default 64), ``sample``. Output: a DataFrame with ``answer``, ``n_latents`` and
``text`` per question, and the request's ``compression_factor``, ``why`` it was used and a
``warning`` ("" when none), the same on each row.

Serving under a budget (issue 26, item 4): a request may give ``latency_budget_ms`` or
``min_accuracy`` (a fraction, 0 to 1) instead of ``compression_factor``, at most one of the three.
The model then picks its factor from the frontier it was logged with (artifact ``frontier``, the
file :data:`colar_core.frontier.FILE_NAME`: accuracy, #L and ms per question of each factor at
evaluation) by :func:`colar_core.frontier.choose`: the most accurate factor whose measured time fits
the budget, or the fastest that meets the accuracy; when none does, the fastest factor and a
``warning``. The times are those of the evaluate stage's machine, in batches (that module's
docstring), not a promise about this server's response time. A model logged without a frontier
answers a budget with HTTP 400; ``compression_factor`` works as before. Two of the three params, a
budget <= 0 or a ``min_accuracy`` outside 0..1: HTTP 400.

What one request may cost is bounded (issue 22, item 15):

- Caps, set by whoever loads the model, never by a request: ``max_latents`` at most
  ``serve_max_latents`` and at most ``serve_max_rows`` questions per call (both 1024 by default,
  :data:`LIMITS`). Set them with ``mlflow.pyfunc.load_model(uri, model_config={"serve_max_latents": N,
  "serve_max_rows": M})`` or, for ``mlflow models serve``, the environment variables
  ``COLAR_SERVE_MAX_LATENTS`` / ``COLAR_SERVE_MAX_ROWS`` (model_config wins). A request above a cap is
  HTTP 400 (INVALID_PARAMETER_VALUE) naming it, the value asked for and the cap.
- Inside MLflow's scoring server (``mlflow models serve``), whose middleware answers 504 once a
  request has run ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` seconds (default 60; ``-t``) but cannot
  stop the thread that predicts, the generation itself stops within one decoder step of that timeout
  (``colar_core.inference`` ``stop``). It also stops at its next step once the server is shutting
  down (SIGTERM or SIGINT, :func:`server_shutting_down`): uvicorn's graceful shutdown waits for the
  request in progress and ``asyncio.run`` for the thread that predicts, so a generation left running
  kept the server alive. A request stopped this way answers 504 (timeout) or 503 (shutdown) if its
  client is still there, and a warning line goes to the server's log.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional

import mlflow
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from colar_core.config import GenerationConfig
from colar_core.evaluation import check_compression_factors
from colar_core.frontier import Choice, Frontier, choose, given
from colar_core.inference import GenerationStopped, StopCheck, generate
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder

logger = logging.getLogger("tasks.pyfunc_model")

#: The caps on one request and their defaults: ``model_config`` key -> default. Each is also read
#: from the environment variable ``COLAR_`` + the key in capitals (module docstring).
LIMITS = {"serve_max_latents": 1024, "serve_max_rows": 1024}
#: The environment variable MLflow's scoring server sets to the model it serves (its uvicorn app reads
#: it): present only in that server's processes.
SCORING_SERVER_MARK = "__pyfunc_model_path__"


class ColarPyfunc(PythonModel):
    def __init__(self):
        self.limits = dict(LIMITS)
        self.timeout_s: Optional[float] = None  # a request's deadline: only inside MLflow's scoring server
        self.frontier: Optional[Frontier] = None  # what a budget is chosen from (module docstring)

    def load_context(self, context):
        """Load the logged model folder. Remote code and an outside LoRA base are the loader's choice,
        never the folder's: ``mlflow.pyfunc.load_model(uri, model_config={"trust_remote_code": True,
        "base_model": ...})``. The artifact ``frontier``, when the model has one, is what budgets choose from."""
        allowed = dict(getattr(context, "model_config", None) or {})
        self.limits = serving_limits(allowed)
        self.model, tokenizer = ColarModel.load_dir(
            context.artifacts["colar_model"], is_trainable=False,
            trust_remote_code=bool(allowed.get("trust_remote_code", False)), base_model=allowed.get("base_model"))
        self.encoder = PromptEncoder(tokenizer)
        # The frontier logged with the model (tasks.report.log_colar_model); a model logged without one
        # (before issue 26, or with no timed factor) serves compression_factor only. A file that is not a
        # frontier stops the model from loading.
        frontier_path = context.artifacts.get("frontier")
        self.frontier = Frontier.from_json(Path(frontier_path).read_text()) if frontier_path else None
        # Under MLflow's scoring server: the request timeout its middleware answers 504 at (module
        # docstring). Elsewhere (a Python caller) no deadline applies.
        self.timeout_s = None
        if os.environ.get(SCORING_SERVER_MARK):
            self.timeout_s = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())

    def predict(self, context, model_input, params=None):
        limits = self.limits
        choice, gen, seed = request_settings(dict(params or {}), self.model.state.trained_compression_factors,
                                             max_latents_cap=limits["serve_max_latents"], frontier=self.frontier)
        c = choice.compression_factor
        if isinstance(model_input, pd.DataFrame):
            questions = [str(q) for q in model_input["question"]]
        else:
            questions = [str(q) for q in model_input]
        if len(questions) > limits["serve_max_rows"]:
            raise MlflowException(
                f"questions: at most {limits['serve_max_rows']} rows per request on this server "
                f"(COLAR_SERVE_MAX_ROWS), got {len(questions)}; send them in smaller requests",
                error_code=INVALID_PARAMETER_VALUE)
        started = time.monotonic()
        try:
            gens = generate(self.model, self.encoder, questions, "latent", c, gen, seed=seed,
                            stop=request_stop(self.timeout_s, server_shutting_down))
        except GenerationStopped as err:
            logger.warning("colar: stopped a request of %d question(s), max_latents %d, after %.1f s: %s",
                           len(questions), gen.max_latents, time.monotonic() - started, err)
            raise MlflowException(f"stopped: {err}", error_code=TEMPORARILY_UNAVAILABLE if server_shutting_down()
                                  else DEADLINE_EXCEEDED) from None
        return pd.DataFrame({"answer": [g.answer for g in gens], "n_latents": [g.n_latents for g in gens],
                             "text": [g.text for g in gens], "compression_factor": [c] * len(gens),
                             "why": [choice.reason] * len(gens), "warning": [choice.warning] * len(gens)})


def serving_limits(model_config: Mapping[str, Any]) -> dict[str, int]:
    """The caps of :data:`LIMITS` for this load: the loader's ``model_config``, else the environment
    (``COLAR_SERVE_MAX_LATENTS``, ``COLAR_SERVE_MAX_ROWS``), else the default. A value that is not a
    whole number >= 1 is a ValueError naming where it came from (the model does not load)."""
    limits = {}
    for key, default in LIMITS.items():
        env = f"COLAR_{key.upper()}"
        raw, source = (model_config[key], f"model_config {key}") if key in model_config else (os.environ.get(env), env)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            limits[key] = default
            continue
        value = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        if isinstance(raw, str) and raw.strip().isdecimal():
            value = int(raw)
        if value is None or value < 1:
            raise ValueError(f"{source}: must be a whole number >= 1, got {raw!r}")
        limits[key] = value
    return limits


def request_stop(timeout_s: Optional[float], shutting_down: Callable[[], bool]) -> StopCheck:
    """The stop check of one request: a reason once ``timeout_s`` (None: no deadline) has passed since
    this call, or once ``shutting_down()``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def check() -> Optional[str]:
        if shutting_down():
            return "the server is shutting down (SIGTERM or SIGINT)"
        if deadline is not None and time.monotonic() >= deadline:
            return (f"the request ran past the server's request timeout of {timeout_s:g} s "
                    "(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), at which the server answers 504")
        return None
    return check


def server_shutting_down() -> bool:
    """True once the uvicorn server of this process (MLflow's scoring server runs on uvicorn) has been
    told to exit. uvicorn handles SIGTERM and SIGINT with its ``Server.handle_exit``, which sets that
    server's ``should_exit``: the handler in force names the server, from any thread. A handler set
    when the model loads would not do: with one worker uvicorn loads the app first and then replaces
    the handlers with its own until it has shut down, which is what a running generation prevents."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return type(server).__module__.startswith("uvicorn.") and getattr(server, "should_exit", False) is True


def request_settings(params: dict, trained: list[int], max_latents_cap: Optional[int] = None,
                     frontier: Optional[Frontier] = None) -> tuple[Choice, GenerationConfig, int]:
    """The compression factor (with why it was chosen: :class:`~colar_core.frontier.Choice`),
    generation settings and seed a request asks for, checked as the evaluate stage checks its factors: a
    bad value is MLflow's INVALID_PARAMETER_VALUE (HTTP 400 from the scoring server) with a one-line
    message naming the param, never a stack trace. ``max_latents_cap``: the most latents this server
    allows (None: no cap). ``frontier``: the model's, from which ``latency_budget_ms`` or
    ``min_accuracy`` choose the factor (module docstring; None: a request with either is refused).

    A param that is absent or None is not given (the signature declares ``compression_factor``,
    ``latency_budget_ms`` and ``min_accuracy`` with the default None, which MLflow fills in)."""
    def refuse(message: str) -> MlflowException:
        return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)

    def number(name: str, kind: Callable[[Any], Any], default: Any) -> Any:
        value = params.get(name)
        if value is None:
            return default
        what = "compression_factor, max_latents and seed are integers" if kind is int else "a number"
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise refuse(f"{name}: {what}, got {value!r}")
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise refuse(f"{name}: {what}, got {value!r}") from None

    asked_c = number("compression_factor", int, None)
    budget = number("latency_budget_ms", float, None)
    min_accuracy = number("min_accuracy", float, None)
    max_latents = number("max_latents", int, 64)
    seed = number("seed", int, 0)
    named = [name for name, value in (("compression_factor", asked_c), ("latency_budget_ms", budget),
                                      ("min_accuracy", min_accuracy)) if value is not None]
    if len(named) > 1:
        raise refuse(f"{' and '.join(named)}: give at most one of compression_factor, latency_budget_ms and "
                     "min_accuracy")
    if budget is not None or min_accuracy is not None:
        if frontier is None:
            raise refuse(f"{named[0]}: this model was logged without a frontier (the accuracy and time of each "
                         "compression factor at evaluation), so it cannot choose by a budget; give "
                         "compression_factor instead")
        try:
            choice = choose(frontier, latency_budget_ms=budget, min_accuracy=min_accuracy)
        except ValueError as err:
            raise refuse(str(err)) from None
    else:
        choice = given(frontier, 2 if asked_c is None else asked_c, default=asked_c is None)
    try:
        check_compression_factors([choice.compression_factor], trained, field="compression_factor")
    except ValueError as err:
        raise refuse(f"{err}; allowed: 1 to {max(trained) if trained else 'any'}") from None
    if max_latents < 1:
        raise refuse(f"max_latents: must be >= 1, got {max_latents}")
    if max_latents_cap is not None and max_latents > max_latents_cap:
        raise refuse(f"max_latents: at most {max_latents_cap} on this server (COLAR_SERVE_MAX_LATENTS), "
                     f"got {max_latents}")
    sample = bool(params.get("sample", False))
    return choice, GenerationConfig(max_latents=max_latents, sample_latents=sample, do_sample=sample), seed


mlflow.models.set_model(ColarPyfunc())
