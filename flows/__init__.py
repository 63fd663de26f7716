"""The DAG: the CoLaR pipeline as a Prefect flow (``pipeline``: prepare -> SFT -> RL -> baselines ->
evaluate -> report), the evaluate-only flow (``single_stage``), their config (``config``), run
comparison (``compare``) and the ``colar`` command (``cli``). The servers they talk to are started by
``colar_infra.servers``.

Submodules are imported on demand, so ``import flows`` stays cheap.
"""
