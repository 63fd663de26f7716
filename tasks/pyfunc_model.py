"""MLflow "model from code": a pyfunc whose predict runs CoLaR latent reasoning.

Logged by path (no pickled Python objects). Input: a DataFrame with a ``question`` column (or a
list of strings). Params: ``compression_factor`` (the speed, default 2), ``seed``,
``max_latents``, ``sample``. Output: a DataFrame with ``answer``, ``n_latents`` and ``text`` per
question.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from colar_core.config import GenerationConfig
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
        params = dict(params or {})
        if isinstance(model_input, pd.DataFrame):
            questions = [str(q) for q in model_input["question"]]
        else:
            questions = [str(q) for q in model_input]
        gen = GenerationConfig(max_latents=int(params.get("max_latents", 64)),
                               sample_latents=bool(params.get("sample", False)),
                               do_sample=bool(params.get("sample", False)))
        gens = generate(self.model, self.encoder, questions, "latent", int(params.get("compression_factor", 2)), gen,
                        seed=int(params.get("seed", 0)))
        return pd.DataFrame({"answer": [g.answer for g in gens], "n_latents": [g.n_latents for g in gens],
                             "text": [g.text for g in gens]})


mlflow.models.set_model(ColarPyfunc())
