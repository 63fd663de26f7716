"""MLflow "model from code": a pyfunc whose predict runs CoLaR latent reasoning.

Logged by path (no pickled Python objects). Input: a DataFrame with a ``question`` column (or a
list of strings). Params: ``compression_factor`` (the speed, default 2), ``seed``,
``max_latents``, ``sample``. Output: a DataFrame with ``answer``, ``n_latents`` and ``text`` per
question.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from colar_core.config import GenerationConfig
from colar_core.evaluation import check_compression_factors
from colar_core.inference import generate
from colar_core.model import ColarModel
from colar_core.text import PromptEncoder


class ColarPyfunc(PythonModel):
    def load_context(self, context):
        """Load the logged model folder. Remote code and an outside LoRA base are the loader's choice,
        never the folder's: ``mlflow.pyfunc.load_model(uri, model_config={"trust_remote_code": True,
        "base_model": ...})``."""
        allowed = dict(getattr(context, "model_config", None) or {})
        self.model, tokenizer = ColarModel.load_dir(
            context.artifacts["colar_model"], is_trainable=False,
            trust_remote_code=bool(allowed.get("trust_remote_code", False)), base_model=allowed.get("base_model"))
        self.encoder = PromptEncoder(tokenizer)

    def predict(self, context, model_input, params=None):
        c, gen, seed = request_settings(dict(params or {}), self.model.state.trained_compression_factors)
        if isinstance(model_input, pd.DataFrame):
            questions = [str(q) for q in model_input["question"]]
        else:
            questions = [str(q) for q in model_input]
        gens = generate(self.model, self.encoder, questions, "latent", c, gen, seed=seed)
        return pd.DataFrame({"answer": [g.answer for g in gens], "n_latents": [g.n_latents for g in gens],
                             "text": [g.text for g in gens]})


def request_settings(params: dict, trained: list[int]) -> tuple[int, GenerationConfig, int]:
    """The compression factor, generation settings and seed a request asks for, checked as the evaluate
    stage checks its factors: a bad value is MLflow's INVALID_PARAMETER_VALUE (HTTP 400 from the scoring
    server) with a one-line message naming the param, never a stack trace."""
    def refuse(message: str) -> MlflowException:
        return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)

    try:
        c = int(params.get("compression_factor", 2))
        max_latents = int(params.get("max_latents", 64))
        seed = int(params.get("seed", 0))
    except (TypeError, ValueError) as err:
        raise refuse(f"compression_factor, max_latents and seed are integers: {err}") from None
    try:
        check_compression_factors([c], trained, field="compression_factor")
    except ValueError as err:
        raise refuse(f"{err}; allowed: 1 to {max(trained) if trained else 'any'}") from None
    if max_latents < 1:
        raise refuse(f"max_latents: must be >= 1, got {max_latents}")
    sample = bool(params.get("sample", False))
    return c, GenerationConfig(max_latents=max_latents, sample_latents=sample, do_sample=sample), seed


mlflow.models.set_model(ColarPyfunc())
