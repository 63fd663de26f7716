"""What a stage run records besides params and metrics: artifact folders and dataset inputs (with the
pipeline's own content digest, :func:`colar_core.files.content_digest`)."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException

from colar_infra.tracking.runs import client_or_default

__all__ = ["log_artifact_dir", "log_dataset_input"]

log = logging.getLogger(__name__)


def log_artifact_dir(
    client: Optional[MlflowClient], run_id: str, path: Union[str, os.PathLike], artifact_path: Optional[str] = None
) -> None:
    """Upload a directory (its contents under ``artifact_path``) or a single file to ``run_id``."""
    client = client_or_default(client)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise FileNotFoundError(f"log_artifact_dir: {path} does not exist")


def _read_table(path: Path) -> pd.DataFrame:
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".jsonl", ".jsonl.gz")):
        return pd.read_json(path, lines=True)
    if suffix.endswith((".json", ".json.gz")):
        return pd.read_json(path)
    if suffix.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path)
    if suffix.endswith(".parquet"):
        return pd.read_parquet(path)
    raise ValueError(f"log_dataset_input: cannot read {path} (use .jsonl, .json, .csv or .parquet, or pass a DataFrame)")


def log_dataset_input(
    run_id: str,
    path_or_df: Any,
    digest: Optional[str] = None,
    name: Optional[str] = None,
    context: Optional[str] = "training",
    *,
    source: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
    client: Optional[MlflowClient] = None,
) -> DatasetInput:
    """Record a dataset as an input of ``run_id`` (the run's "Datasets used" in the UI).

    ``path_or_df``: a DataFrame or a .jsonl/.json/.csv/.parquet file (read to infer the schema and
    profile). ``digest``: the pipeline's own content hash (MLflow computes one if None).
    ``source``: where the data lives (default: the file's ``file://`` URI; for a DataFrame, MLflow's
    code source, i.e. the running script). ``context`` becomes the
    ``mlflow.data.context`` input tag ("training", "eval"...). Returns the logged DatasetInput.
    """
    if isinstance(path_or_df, pd.DataFrame):
        df = path_or_df
        default_source, default_name = None, None
    else:
        path = Path(path_or_df).resolve()
        df = _read_table(path)
        default_source, default_name = path.as_uri(), path.name
    with warnings.catch_warnings():
        # "source can be interpreted in multiple ways" and integer-column schema hints are noise here
        warnings.simplefilter("ignore", UserWarning)
        # source None is MLflow's own default (the running code), though its annotation leaves None out
        dataset = from_pandas(df, source=source or default_source,  # type: ignore[arg-type]
                              name=name or default_name, digest=digest)
        d = dataset.to_dict()  # schema/profile are inferred here
    entity = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=d["source"],
        schema=d.get("schema"),
        profile=d.get("profile"),
    )
    input_tags = [InputTag(key=str(k), value=str(v)) for k, v in (tags or {}).items()]
    if context:
        input_tags.append(InputTag(key="mlflow.data.context", value=context))
    ds_input = DatasetInput(dataset=entity, tags=input_tags)
    _log_inputs(client_or_default(client), run_id, ds_input)
    return ds_input


#: How MLflow's server reports the dataset-insert race below (PostgreSQL, SQLite, MySQL wording).
_DATASET_RACE = re.compile(r"UniqueViolation|duplicate key value|UNIQUE constraint failed|Duplicate entry", re.I)


def _log_inputs(client: MlflowClient, run_id: str, ds_input: DatasetInput, attempts: int = 3) -> None:
    """``client.log_inputs``, again when it lost the server's dataset race: the server looks the dataset
    up and inserts it if missing, so two pipelines logging the same data at the same moment (three
    pipelines started together on a PostgreSQL-backed server did) make one insert fail on the unique
    key. The dataset exists by then (the failed call is rolled back), so the next call links it."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=[ds_input])
            return
        except MlflowException as err:
            if attempt + 1 >= attempts or not _DATASET_RACE.search(str(err)):
                raise
            log.warning("dataset %s: another run inserted it at the same moment (dataset insert race); "
                        "linking it again, attempt %d", ds_input.dataset.name, attempt + 2)
            time.sleep(0.2 * (attempt + 1))
