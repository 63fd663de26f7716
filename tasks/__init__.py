"""Thin Prefect tasks around ``colar_core``; ``colar.tasks.tracking`` holds the MLflow helpers they share.

Submodules are imported on demand, so ``import tasks`` stays cheap.
"""
