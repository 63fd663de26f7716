"""Prefect flows: the CoLaR pipeline as a DAG (prepare data -> SFT -> RL -> evaluate).

``colar.flows.servers`` starts and stops the local MLflow and Prefect servers the flows talk to.
Submodules are imported on demand, so ``import flows`` stays cheap.
"""
