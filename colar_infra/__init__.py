"""The plumbing around the pipeline, apart from the DAG: the local MLflow and Prefect servers
(:mod:`colar_infra.servers`), their SQLite or PostgreSQL backends and MLflow's basic auth
(:mod:`colar_infra.backends`), MLflow tracking (:mod:`colar_infra.tracking`: runs, what is kept while the
server is away, the training-metrics sender, system metrics, params) and secret masking (:mod:`colar_infra.secrets`).

It imports ``colar_core`` (for the shared low-level helpers) and never ``flows`` or ``tasks``.
"""
