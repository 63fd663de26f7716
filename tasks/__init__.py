"""Thin Prefect tasks around ``colar_core``, one module per stage (``prepare``, ``training``,
``evaluate``, ``report``), and the MLflow helpers they share: ``runs`` (parent and child runs),
``params`` (config to params, secret masking), ``artifacts``, ``metrics_sender`` (training metrics),
``stage_spec`` and ``keys`` (how a stage is described, keyed and called), ``plots``.

Submodules are imported on demand, so ``import colar.tasks`` stays cheap.
"""
