"""The paper's latent-reasoning baselines (Table 1) as methods of the same training stage skeleton.

* :mod:`.icot`     - iCoT, stepwise internalization: reasoning steps removed from the training text,
  stage by stage;
* :mod:`.coconut`  - Coconut: the removed steps replaced by continuous thoughts (last hidden states
  fed back as input embeddings);
* :mod:`.distill`  - Distill (CODI-style self-distillation): a teacher pass over the chain and a
  student pass over a fixed number of continuous thoughts, tied at the answer's hidden states.

Each trains through :func:`colar_core.baselines.stage.train_baseline` on the shared loop, engines,
checkpoints and callbacks, and saves an ordinary ColarModel folder whose ``colar_config.json``
records the method, so :func:`colar_core.inference.generate` decodes it the way it was trained.
This ``__init__`` imports nothing (``colar_core.model`` imports :mod:`.thoughts` lazily).
"""
