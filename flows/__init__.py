"""Prefect flows: the CoLaR pipeline as a DAG (prepare -> SFT -> RL -> evaluate -> report).

``colar.flows.servers`` starts and stops the local MLflow and Prefect servers the flows talk to.
Submodules are imported on demand, so ``import colar.flows`` stays cheap.
"""
