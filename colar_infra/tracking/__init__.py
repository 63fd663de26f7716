"""MLflow tracking for the pipeline: parent and child runs and how they end (``runs``), what a run keeps while
the server is away (``pending``), the background metrics sender of training stages (``metrics_sender``),
MLflow's system metrics (``system_metrics``) and configs as params (``params``)."""
