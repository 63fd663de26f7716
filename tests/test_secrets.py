"""Issue 12, secrets: credentials in a URL never reach the console, the Prefect log or MLflow names
(docs/RELIABILITY.md, "Trust boundaries and secrets")."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from colar_infra.secrets import mask_secrets, mask_url
from colar_infra.tracking.params import flatten_params
from flows import cli

SECRET = "s3cretpw"
DEAD_URI = f"http://user:{SECRET}@127.0.0.1:9"


@pytest.mark.parametrize("text, masked", [
    ("http://user:pw@host:5000", "http://user:***@host:5000"),
    ("https://:tok123@host/x", "https://***@host/x"),                 # empty username: no "user:" to keep
    ("https://tok123@host/x", "https://***@host/x"),                   # userinfo without a colon: a bare token
    ("https://user:p@ss@host/a@b", "https://user:***@host/a@b"),       # a raw "@" in the password
    ("git+ssh://git@github.com/org/repo", "git+ssh://***@github.com/org/repo"),
    ("see http://a:b@h1 and https://t@h2/p?q=1", "see http://a:***@h1 and https://***@h2/p?q=1"),
    ("http://host/path@x", "http://host/path@x"),                      # "@" after the host: not userinfo
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
    ("plain text user@example.com", "plain text user@example.com"),
])
def test_mask_url_masks_the_whole_userinfo(text, masked):
    assert mask_url(text) == masked
    assert mask_secrets(text) == masked


@pytest.mark.parametrize("text, masked", [
    # libpq takes a password from the query string as well as from the userinfo (issue 22, item 9)
    ("postgresql://postgres@127.0.0.1:5432/postgres?password=s3cretpw",
     "postgresql://***@127.0.0.1:5432/postgres?password=***"),
    ("postgresql+psycopg2://h/db?sslmode=require&password=a%26b&application_name=x",
     "postgresql+psycopg2://h/db?sslmode=require&password=***&application_name=x"),
    ("postgresql://h/db?pass%77ord=pw", "postgresql://h/db?pass%77ord=***"),   # libpq decodes the name too
    ("postgresql://h/db?sslpassword=keypw", "postgresql://h/db?sslpassword=***"),
    ('{"database": "postgresql://h/db?password=pw", "n": 1}', '{"database": "postgresql://h/db?password=***", "n": 1}'),
    ("https://h/api?token=abc&max_new_tokens=5&pad_token=x", "https://h/api?token=***&max_new_tokens=5&pad_token=x"),
    ("https://h/?api_key=k1&page=2", "https://h/?api_key=***&page=2"),
    ("https://h/?password=", "https://h/?password="),                          # nothing to hide
])
def test_mask_url_masks_secret_query_parameters(text, masked):
    assert mask_url(text) == masked
    assert mask_secrets(text) == masked


def test_flatten_params_masks_bare_token_urls():
    params = flatten_params({"data": {"source": "https://hf_abcdef123@example.com/d.jsonl"},
                             "x": "https://:hf_abcdef123@example.com"})
    assert "hf_abcdef123" not in json.dumps(params)
    assert params["data.source"] == "https://***@example.com/d.jsonl"


@pytest.mark.parametrize("argv", [["run"], ["retry", "some-run"], ["compare"], ["servers", "start"]])
def test_a_dead_credentialed_tracking_uri_is_reported_without_the_secret(argv, tmp_path, monkeypatch, capsys):
    """``colar compare`` / ``servers`` let ServerError escape as a traceback; every command printed the
    URI with its password."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DEAD_URI)
    monkeypatch.setenv("COLAR_HOME", str(tmp_path / "home"))
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 3
    assert SECRET not in captured.out + captured.err
    assert captured.err.startswith(f"colar {argv[0]}: MLflow server at http://user:***@127.0.0.1:9 ")
    assert len(captured.err.strip().splitlines()) == 1


def test_printed_server_and_run_urls_are_masked(capsys):
    urls = {"mlflow": f"https://user:{SECRET}@mlflow.example.com", "prefect": f"https://{SECRET}@prefect.example.com/api"}
    cli._print_urls(urls, "run1", "7", "flow1")
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "https://user:***@mlflow.example.com/#/experiments/7/runs/run1" in out
    assert "https://***@prefect.example.com/runs/flow-run/flow1" in out


def test_prepare_stage_masks_the_data_source_in_its_log_and_dataset_names(tmp_path, monkeypatch):
    """A ``data.source`` URL with a token reaches neither the Prefect log nor an MLflow dataset name."""
    import tasks.prepare as prepare

    # A source string that is a URL with a token and also an existing path (Path collapses "//").
    source = f"https://{SECRET}@example.com/data.jsonl"
    monkeypatch.chdir(tmp_path)
    Path(source).parent.mkdir(parents=True)
    rows = [{"question": f"Ann has {i} pens and buys 2. How many?", "steps": [f"{i}+2={i + 2}"], "answer": str(i + 2)}
            for i in range(20)]
    Path(source).write_text("".join(json.dumps(r) + "\n" for r in rows))
    names: list[str] = []
    logged: list[str] = []

    class Client:
        def __getattr__(self, name):  # log_metric, set_tag, log_artifact: recorded as nothing
            return lambda *args, **kwargs: None

    @contextmanager
    def child_run(*args, **kwargs):
        yield "run-1"

    monkeypatch.setattr(prepare, "MlflowClient", Client)
    monkeypatch.setattr(prepare, "child_run", child_run)
    monkeypatch.setattr(prepare, "log_dataset_input", lambda *a, name, **k: names.append(name))
    logger = SimpleNamespace(info=lambda msg, *args: logged.append(msg % args))
    monkeypatch.setattr(prepare, "get_run_logger", lambda: logger)
    data = {"source": source, "format": "jsonl", "policy": "fail", "val_fraction": 0.1, "test_fraction": 0.2,
            "seed": 0, "builtin": {}}
    result = prepare.prepare_stage.fn(data, {"name_or_path": "tiny"}, str(tmp_path / "stage"), "parent", "key")
    assert result.counts["test"] == 4
    assert names == [f"https://***@example.com/data.jsonl:{s}" for s in ("train", "val", "test")]
    assert logged and SECRET not in "\n".join(logged)
    assert logged[-1].startswith("prepared https://***@example.com/data.jsonl: ")
