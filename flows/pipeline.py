"""The CoLaR pipeline as a Prefect flow: prepare -> SFT (CoT) -> SFT (CoLaR) -> RL -> SFT (No-CoT)
-> the baselines (iCoT, Coconut, Distill) -> evaluate -> report (the CoT, RL, No-CoT and baseline
stages as configured).

The flow validates the whole config first and opens (or, on retry, reuses) one MLflow parent run.
Each stage is described once (:class:`~tasks.stage_spec.StageSpec`): its cache key (config
section, content digests of its inputs, absolute output folder, code version), its folder and the
task's arguments all come from that description. Stages already finished under the same key come
back Cached; the failed one runs again in its own folder and resumes from its checkpoint. The run's
config holds the absolute ``output_dir`` from the start (``config.json`` too), so ``colar retry``
from any directory finds the same folders.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, TypeVar

from mlflow import MlflowClient
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Crashed

from colar_core.config import TEST_SPLIT
from colar_core.files import exclusive_lock
from colar_core.procs import identity_alive
from colar_core.procs import process_identity as _process_identity
from colar_core.training.launch import LAUNCHER_RECORD, check_no_live_launcher, describe_launcher, live_launcher
from colar_infra.tracking.runs import end_orphaned_children, ending_run, log_metrics, start_parent_run
from flows.config import PipelineConfig, preflight
from flows.retry import RetryPlan
from tasks.evaluate import EvaluateResult, evaluate_stage
from tasks.keys import StageCode, code_version, data_inputs, eval_inputs, model_inputs, stage_code, validates
from tasks.prepare import PrepareResult, prepare_stage
from tasks.report import report_stage
from tasks.stage_spec import StageResult, StageSpec
from tasks.training import TrainResult, baseline_stage, rl_stage, sft_stage

R = TypeVar("R", bound=StageResult)

PROCESS_TAG = "colar.process"  # "host:pid:start-ticks" of the process running the flow (see still_running)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def still_running(parent_run, output_dir: Optional[str] = None) -> Optional[str]:
    """Why the pipeline of ``parent_run`` (an MLflow Run) is still running, or None if it is not.

    A RUNNING parent whose recorded process is alive on this host is running; a RUNNING parent whose
    process is gone (SIGKILL, power loss) is an orphan that ``colar retry`` may take over. A process
    on another host cannot be checked from here and counts as gone. Whatever the status, a training
    launcher that outlived the flow (its process group still alive, recorded in ``launcher.json`` of
    a stage folder under ``output_dir``, default the run's ``output_dir`` param) is running too.
    """
    if parent_run.info.status == "RUNNING":
        recorded = parent_run.data.tags.get(PROCESS_TAG, "")
        host, _, rest = recorded.partition(":")
        pid, _, _ = rest.partition(":")
        if pid.isdigit() and int(pid) != os.getpid() and identity_alive(recorded):
            return f"process {pid} on {host}"
    output_dir = output_dir or (getattr(parent_run.data, "params", None) or {}).get("output_dir")
    return _live_launcher_in(Path(output_dir)) if output_dir else None


def _live_launcher_in(output_dir: Path) -> Optional[str]:
    """A live training launcher recorded in a stage folder under ``output_dir``, described; None if none."""
    for record in sorted(output_dir.glob(f"*/{LAUNCHER_RECORD}")):
        if (rec := live_launcher(record.parent)) is not None:
            return f"training {describe_launcher(rec)}, stage folder {record.parent}"
    return None


@contextlib.contextmanager
def _stage_lock(out: Path, timeout_s: float):
    """Exclusive lock on a stage folder across processes: two pipelines whose stages share a key
    (same output_dir, same section and inputs) do that stage one after the other, and the second
    finds it finished, instead of both writing the same checkpoints. Released by the kernel if
    the holder dies; a waiter logs the holder and gives up after ``timeout_s`` (the config's
    ``stage_lock_timeout_s``) with :class:`~colar_core.files.LockTimeout`. A training
    launcher left alive in the folder by a killed flow stops the stage (LauncherAliveError)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", timeout_s=timeout_s, holder=f"stage {out.name}",
                        on_wait=_log_warning):
        check_no_live_launcher(out)
        yield


def _log_warning(message: str) -> None:
    """A warning in the flow run's log (the module log outside a flow run)."""
    try:
        get_run_logger().warning(message)
    except Exception:  # noqa: BLE001 - no run context
        logging.getLogger(__name__).warning(message)


def _run_stage(spec: StageSpec, result_type: type[R], timings: dict, states: dict, lock_timeout_s: float,
               plan: RetryPlan, parent_run_id: str) -> R:
    """Run a stage in its folder (:meth:`StageSpec.run`: re-run if its cached folder was deleted) and
    return its result, which must be a ``result_type`` (the flow reads it by attribute). In a retry,
    a stage that finished in the pipeline run under other code is reused as it is (``plan``:
    :class:`~flows.retry.RetryPlan`); ``--from`` runs it again whatever the cache holds.

    Records in ``states`` the stage's state name (``Cached`` when skipped, ``Reused`` when a retry
    reused it) and in ``timings`` the stage's wall time as the flow sees it and the time of its own
    work (the colar_core call), so the orchestration overhead (Prefect + MLflow) is their difference.
    """
    if (folder := plan.reusable(spec)) is not None:
        return _reuse_stage(spec, folder, result_type, states, plan, parent_run_id)
    with _stage_lock(spec.folder, lock_timeout_s):
        if (note := plan.carry_over(spec)) is not None:
            _log_warning(note)
        plan.started(spec)
        t0 = time.perf_counter()
        state = spec.run(refresh=plan.forced(spec))
        wall = time.perf_counter() - t0
    states[spec.name] = state.name
    plan.ran(spec, state.name)
    result = state.result()  # raises the stage's exception if it failed
    if not isinstance(result, result_type):  # a cached result of another type (or a task that returned one)
        raise TypeError(f"stage {spec.name} returned {type(result).__name__}, not a {result_type.__name__}")
    plan.finished(spec)
    if state.name != "Cached":
        timings[spec.name] = {"wall_s": wall, "work_s": result.work_s, "overhead_s": wall - result.work_s}
    return result


def _reuse_stage(spec: StageSpec, folder: Path, result_type: type[R], states: dict, plan: RetryPlan,
                 parent_run_id: str) -> R:
    """A retry reuses the result a stage left in ``folder`` when it finished in this pipeline run
    (under code or inputs that have changed since): logged, tagged on the parent run
    (``colar.reused.<stage>``: the code digest it was made with and today's) and listed in the
    flow run's ``colar-retry`` artifact."""
    try:
        result = result_type.load(folder)
    except ValueError as err:  # a result of another shape: today's code cannot read it
        raise RuntimeError(f"stage {spec.name}: cannot reuse {folder}: {err}; re-run it with "
                           f"`colar retry <run> --from {spec.name}`") from None
    record = plan.reuse(spec, folder)
    why = ("code changed" if record.code != spec.code_digest else "inputs or config changed")
    line = (f"made with code {record.code[:16]}, today's {spec.code_digest[:16]} ({why}); "
            f"folder {folder.name}")
    states[spec.name] = "Reused"
    _log_warning(f"stage {spec.name} reused as it finished in this pipeline run: {line}")
    with contextlib.suppress(Exception):  # a tag is a record for the reader; the result is the file
        MlflowClient().set_tag(parent_run_id, f"colar.reused.{spec.name}", line)
    return result


@flow(name="colar-pipeline", log_prints=True)
def colar_pipeline(config: dict, parent_run_id: Optional[str] = None, from_stage: Optional[str] = None) -> dict:
    """Run every stage of ``config`` (a PipelineConfig as a dict). ``parent_run_id`` retries a run:
    the stages that finished in it are reused (:mod:`flows.retry`), except ``from_stage`` and the
    stages after it, which run again."""
    logger = get_run_logger()
    cfg = PipelineConfig.model_validate(config).for_run()  # absolute output_dir, in config.json too
    preflight(cfg)  # model path, dataset id: fail before any stage (the CLI checked already)
    check_from_stage(cfg, from_stage)
    retry = parent_run_id is not None
    conf = cfg.model_dump(mode="json")
    client = MlflowClient()
    if parent_run_id is None:
        tags = {"colar.config_hash": cfg.digest(), "colar.code_version": code_version()[:16],
                "prefect.flow_run_id": str(flow_run.get_id() or ""), "colar.pipeline": cfg.name,
                PROCESS_TAG: _process_identity()}
        if commit := git_commit():
            tags["mlflow.source.git.commit"] = commit
        parent_run_id = start_parent_run(cfg.tracking.experiment, cfg.name, tags, conf)
        client.log_text(parent_run_id, json.dumps(conf, indent=2, sort_keys=True), "config.json")
    else:
        parent = client.get_run(parent_run_id)
        if (alive := still_running(parent)) is not None:
            raise RuntimeError(f"pipeline run {parent_run_id} is still running ({alive}); not retrying it twice")
        previous = [parent.data.tags.get(t) for t in ("prefect.flow_run_id", "prefect.flow_run_id.retry")]
        client.set_tag(parent_run_id, "prefect.flow_run_id.retry", str(flow_run.get_id() or ""))
        client.set_tag(parent_run_id, PROCESS_TAG, _process_identity())
        # A killed attempt (SIGKILL, lost machine) left its stage runs RUNNING: close them as KILLED.
        for run_id in end_orphaned_children(parent_run_id, client=client):
            logger.warning("MLflow child run %s was left RUNNING by a dead attempt: marked KILLED", run_id)
        _crash_orphaned_flow_runs([p for p in previous if p and p != str(flow_run.get_id())], logger)
    logger.info("MLflow parent run %s", parent_run_id)

    timings: dict = {}
    with ending_run(parent_run_id):
        plan = RetryPlan(cfg.output_dir, parent_run_id, retry=retry, from_stage=from_stage)
        try:
            result = _run_stages(cfg, conf, parent_run_id, timings, plan)
        finally:
            _log_timings(parent_run_id, timings)
            if retry:
                retry_artifact(plan, from_stage)
    return {"parent_run_id": parent_run_id, **result}


def stage_names(cfg: PipelineConfig) -> list[str]:
    """The stages of ``cfg``'s pipeline, in the order they run (``report`` last)."""
    return (["prepare"] + (["sft-cot"] if cfg.sft_cot else []) + ["sft-colar"] + (["rl"] if cfg.rl is not None else [])
            + (["sft-nocot"] if cfg.eval.nocot_baseline else []) + [f"sft-{m}" for m, _ in cfg.baselines.selected()]
            + ["evaluate", "report"])


def check_from_stage(cfg: PipelineConfig, from_stage: Optional[str]) -> None:
    """``--from STAGE`` must name a stage of this pipeline: a ``ValueError`` listing them otherwise."""
    if from_stage is not None and from_stage not in (names := stage_names(cfg)):
        raise ValueError(f"--from {from_stage}: this pipeline has no stage {from_stage!r}; its stages: "
                         f"{', '.join(names)}")


def retry_artifact(plan: RetryPlan, from_stage: Optional[str]) -> None:
    """The flow run's ``colar-retry`` markdown artifact: what this retry reused, and from which code."""
    lines = ["### colar retry", ""]
    if from_stage:
        lines += [f"`--from {from_stage}`: {from_stage} and the stages after it ran again.", ""]
    if plan.reused:
        lines += ["| stage | reused from folder | made with code |", "| --- | --- | --- |"]
        lines += [f"| {name} | `{Path(r.folder).name}` | `{r.code[:16]}` |" for name, r in plan.reused.items()]
    else:
        lines.append("No stage was reused from earlier code (finished stages under today's keys come back Cached).")
    with contextlib.suppress(Exception):  # no Prefect API (a test calling the flow function): nothing to show
        create_markdown_artifact("\n".join(lines) + "\n", key="colar-retry",
                                 description="Stages a colar retry reused, and the code they were made with")


def _run_stages(cfg: PipelineConfig, conf: dict, parent_run_id: str, timings: dict, plan: RetryPlan) -> dict:
    """prepare -> sft-cot -> sft-colar -> rl -> sft-nocot -> sft-icot / sft-coconut / sft-distill ->
    evaluate -> report (optional ones as configured); returns the evaluation metrics, the report's
    model URIs and each stage's Prefect state name (``stages``)."""
    out_root = cfg.output_dir
    states: dict[str, str] = {}

    def run(task, name: str, config: dict, inputs: dict, args: dict, result_type: type[R], code: StageCode) -> R:
        return _run_stage(StageSpec(task, name, config, out_root, inputs, args, code=code), result_type, timings,
                          states, cfg.stage_lock_timeout_s, plan, parent_run_id)

    prep = run(prepare_stage, "prepare", {"data": conf["data"], "model": conf["model"]},
               data_inputs(conf["data"]), {"parent_run_id": parent_run_id,
                                           "needs_test_split": any(s.source == TEST_SPLIT for s in cfg.eval.sets())},
               PrepareResult, stage_code("prepare"))
    data_in = {"data": prep.digest}
    data_args = {"data_dir": prep.data_dir, "parent_run_id": parent_run_id}
    model_in = model_inputs(conf["model"])
    retrying: dict[str, Any] = dict(retries=cfg.training_retries,
                                    retry_delay_seconds=cfg.training_retry_delay_s)

    def sft(stage: str, section: dict, init: Optional[TrainResult]) -> TrainResult:
        """An SFT stage; ``init`` is the result of the stage whose model it starts from."""
        return run(sft_stage.with_options(**retrying), stage, {"train": section, "model": conf["model"]},
                   {**data_in, **model_in, "init": init.model_digest if init else ""},
                   {"stage": stage, "init_model_dir": init.model_dir if init else None,
                    "tokenizer_dir": prep.tokenizer_dir, **data_args}, TrainResult,
                   stage_code("sft", validates=validates(section)))

    cot = sft("sft-cot", conf["sft_cot"], None) if cfg.sft_cot else None
    colar = sft("sft-colar", conf["sft_colar"], cot)
    final = colar
    if cfg.rl is not None:
        final = run(rl_stage.with_options(**retrying), "rl", {"rl": conf["rl"]},
                    {**data_in, **model_in, "init": colar.model_digest},
                    {"init_model_dir": colar.model_dir, "model": conf["model"], **data_args}, TrainResult,
                    stage_code("rl", validates=validates(conf["rl"])))
    nocot = None
    if cfg.eval.nocot_baseline:
        section = json.loads(json.dumps(conf["sft_cot"] or conf["sft_colar"]))
        section["objective"].update(mode="nocot", compression_factors=[1])
        nocot = sft("sft-nocot", section, None)
    baselines: dict[str, TrainResult] = {}
    for method, section in cfg.baselines.selected():
        # iCoT and Coconut start from the CoT model, as the reference (Distill too unless told otherwise)
        init = cot if section.init_from_cot else None
        baselines[method] = run(baseline_stage.with_options(**retrying), f"sft-{method}",
                                {"method": conf["baselines"][method], "model": conf["model"]},
                                {**data_in, **model_in, "init": init.model_digest if init else ""},
                                {"stage": f"sft-{method}", "init_model_dir": init.model_dir if init else None,
                                 "tokenizer_dir": prep.tokenizer_dir, **data_args}, TrainResult,
                                stage_code("baseline", validates=validates(conf["baselines"][method]["train"])))
    evaluation = run(evaluate_stage, "evaluate", {"eval_cfg": conf["eval"]},
                     {"colar": final.model_digest, "cot": cot.model_digest if cot else None,
                      "nocot": nocot.model_digest if nocot else None,
                      **{m: r.model_digest for m, r in baselines.items()},
                      **data_in, **model_in, **eval_inputs(conf["eval"])},
                     {"colar_model_dir": final.model_dir, "cot_model_dir": cot.model_dir if cot else None,
                      "nocot_model_dir": nocot.model_dir if nocot else None, "model": conf["model"],
                      "baseline_model_dirs": {m: r.model_dir for m, r in baselines.items()}, **data_args},
                     EvaluateResult, stage_code("evaluate"))
    report = report_stage(parent_run_id, evaluation.metrics, final.model_dir,
                          str(Path(out_root) / "reports" / parent_run_id),
                          cfg.tracking.registered_model_name, evaluation.example_question,
                          {"rule": cfg.tracking.promotion.rule,
                           "metric": cfg.tracking.promotion.metric_for(cfg.eval.compression_factors)},
                          set_digests=evaluation.set_digests)
    return {"metrics": evaluation.metrics, **report, "stages": states}


def _crash_orphaned_flow_runs(flow_run_ids: list, logger) -> None:
    """Mark earlier flow runs of this pipeline that Prefect still shows running as Crashed (their
    process is gone: ``still_running`` said so). Best effort: a failure here never stops a retry."""
    try:
        with get_client(sync_client=True) as pc:
            for fid in flow_run_ids:
                state = pc.read_flow_run(fid).state
                if state is not None and not state.is_final():
                    pc.set_flow_run_state(fid, Crashed(message="process gone; superseded by colar retry"),
                                          force=True)
                    logger.warning("Prefect flow run %s was left %s by a dead process: marked Crashed", fid,
                                   state.name)
    except Exception as err:  # noqa: BLE001
        logger.warning("could not update earlier Prefect flow runs %s: %r", flow_run_ids, err)


def _log_timings(parent_run_id: str, timings: dict) -> None:
    """``time/{stage}/{wall_s,work_s,overhead_s}`` on the parent run, for stages that ran (not cached)."""
    flat = {f"time/{stage}/{k}": v for stage, t in timings.items() for k, v in t.items()}
    if flat:
        log_metrics(parent_run_id, flat)


def run_pipeline(cfg: PipelineConfig, parent_run_id: Optional[str] = None, return_state: bool = False,
                 from_stage: Optional[str] = None):
    """Run the flow in this process against the Prefect API in ``PREFECT_API_URL``."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    config = cfg.for_run().model_dump(mode="json")
    if return_state:
        return colar_pipeline(config, parent_run_id=parent_run_id, from_stage=from_stage, return_state=True)
    return colar_pipeline(config, parent_run_id=parent_run_id, from_stage=from_stage)
