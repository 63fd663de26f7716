"""The ``prepare`` stage: read or generate the data, validate and split it; build the tokenizer of a
from-scratch ("tiny") model."""

from __future__ import annotations

import time
from typing import Optional

from mlflow import MlflowClient
from prefect import get_run_logger, task

from colar_core.config import ModelConfig
from colar_core.data.prepare import load_split, prepare_data
from colar_core.tokenizer import build_tokenizer
from colar_infra.secrets import mask_secrets
from colar_infra.tracking.artifacts import log_dataset_input
from colar_infra.tracking.runs import child_run
from tasks.keys import CACHED_STAGE
from tasks.stage_spec import StageResult, stage_folder


class PrepareResult(StageResult):
    """What the ``prepare`` stage hands on: the split files' folder and their digest (the input of
    every later stage's key), the tokenizer it built for a from-scratch model (None otherwise) and
    the record counts per split."""

    data_dir: str
    digest: str
    tokenizer_dir: Optional[str]
    counts: dict[str, int]


@task(name="prepare", **CACHED_STAGE, retries=1, retry_delay_seconds=2)
def prepare_stage(data: dict, model: dict, out_dir: str, parent_run_id: str, key: str,
                  needs_test_split: bool = True) -> PrepareResult:
    """Write ``out_dir/data/{train,val,test}.jsonl`` and the manifest; record counts, digests and the
    splits as dataset inputs on the ``prepare`` child run. ``needs_test_split``: the evaluate stage
    reads the test split (an empty one is then an error); False when every evaluation set is its own."""
    logger = get_run_logger()
    out = stage_folder(out_dir)
    client = MlflowClient()
    source = mask_secrets(data["source"])  # it may be a URL with a token: never logged as given
    with child_run(parent_run_id, "prepare", {"data": data}) as run_id:
        builtin = data["builtin"] if data["source"] == "builtin" else None
        t0 = time.perf_counter()
        manifest = prepare_data(data["source"], out / "data", format=data["format"], policy=data["policy"],
                                val_fraction=data["val_fraction"], test_fraction=data["test_fraction"],
                                seed=data["seed"], builtin=builtin)
        if needs_test_split and manifest["counts"]["test"] == 0:  # preflight catches the cases it can see without reading
            raise ValueError(f"field 'data.test_fraction': {source} gave no test split and the evaluate stage "
                             "needs one: set data.test_fraction above 0 or give a test split")
        for split, n in manifest["counts"].items():
            client.log_metric(run_id, f"records/{split}", n)
        client.log_metric(run_id, "records/skipped", manifest["skipped"])
        for split in ("train", "val", "test"):
            # MLflow caps a dataset digest at 36 characters: the first 32 hex of the sha256 go there,
            # the full digest is in the run's tags and the manifest.
            log_dataset_input(run_id, str(out / "data" / f"{split}.jsonl"), manifest["digests"][split][:32],
                              name=f"{source}:{split}", context=split)
            client.set_tag(run_id, f"colar.digest.{split}", manifest["digests"][split])
        client.set_tag(run_id, "colar.digest", manifest["digest"])
        model_cfg = ModelConfig.model_validate(model)
        tokenizer_dir = None
        if model_cfg.name_or_path == "tiny" and model_cfg.tokenizer is None:
            tokenizer_dir = str(out / "tokenizer")
            build_tokenizer(load_split(out / "data" / "train.jsonl"), tokenizer_dir, numbers=model_cfg.number_tokens)
        work_s = time.perf_counter() - t0
        client.log_artifact(run_id, str(out / "data" / "manifest.json"))
        logger.info("prepared %s: %s (digest %s)", source, manifest["counts"], manifest["digest"][:12])
    return PrepareResult(data_dir=str(out / "data"), digest=manifest["digest"], tokenizer_dir=tokenizer_dir,
                         counts=manifest["counts"], mlflow_run_id=run_id, work_s=work_s).save(out)
