"""The DAG's nodes: one thin Prefect task per stage around ``colar_core`` (``prepare``, ``training``,
``evaluate``, ``report``), how a stage is described, keyed and called (``stage_spec``, ``keys``), and
what the report draws on (``table1``, ``plots``, ``promotion``, ``prefect_artifacts``, ``pyfunc_model``).
MLflow tracking itself lives in ``colar_infra.tracking``.

Submodules are imported on demand, so ``import tasks`` stays cheap.
"""
