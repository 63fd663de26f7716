"""colar_core: Compressed Latent Reasoning (CoLaR) as a plain library.

The method lives here: data, tokenizer, the model wrapper with its latent head, losses, training
loops, inference and scoring. Nothing in this package imports Prefect or MLflow, so it runs the
same in a notebook, on a GPU box or under the ``deepspeed`` launcher. Submodules are imported on
demand (``from colar_core.model import ColarModel``) to keep ``import colar_core`` cheap.
"""

__version__ = "0.1.0"
