"""Stage folders on storage every node sees (issue 23, item 3): before a multi-node deepspeed launch each
host of the hostfile is asked over ssh whether it sees the stage folder; a host that does not stops the
stage naming the folder and the host. A rank that cannot read its job file says the same at once.

``ssh`` is a stand-in script here (on PATH): it answers as a host that sees the folder or not. The real
thing, three hosts with sshd and a folder one of them cannot see: tests/test_cluster.py (slow).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from colar_core.training import launch as launch_mod
from colar_core.training.config import LauncherConfig
from colar_core.training.launch import FolderNotSharedError, check_nodes_see, hostfile_hosts, job_entry_main


def _fake_ssh(bin_dir: Path, blind: str, unreachable: str = "") -> None:
    """An ``ssh`` that runs the command locally as host HOST would: ``blind`` sees no folder, ``unreachable``
    is ssh's failure (exit 255)."""
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text(f"""#!/bin/sh
while [ "$1" = "-o" ]; do shift 2; done
host="$1"; shift
if [ "$host" = "{unreachable}" ]; then echo "ssh: connect to host $host port 22: No route to host" >&2; exit 255; fi
echo "$host-name"
if [ "$host" = "{blind}" ]; then exit 1; fi
exit 0
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_hostfile_hosts_reads_the_first_word_of_each_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nworker-1 slots=8\n\n  worker-2 slots=8  # the second\n")
    assert hostfile_hosts(hostfile) == ["worker-1", "worker-2"]


def test_a_host_that_cannot_see_the_stage_folder_is_named_with_the_folder(tmp_path, monkeypatch):
    _fake_ssh(tmp_path / "bin", blind="node-c")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-b slots=1\nnode-c slots=1\nnode-d slots=1\n")
    folder = tmp_path / "runs" / "sft-colar-abc"
    launcher = LauncherConfig(num_gpus=1, num_nodes=2, hostfile=str(hostfile))
    with pytest.raises(FolderNotSharedError) as err:
        check_nodes_see(folder, launcher)
    message = str(err.value)
    assert f"stage folder {folder}: host node-c (node-c-name) cannot see it;" in message
    assert "node-b" not in message and "node-d" not in message  # only the first num_nodes hosts are asked
    assert "shared storage such as NFS" in message
    check_nodes_see(folder, launcher.model_copy(update={"hostfile": None}))  # no hostfile: nothing to ask


def test_a_host_ssh_cannot_reach_is_named_as_such(tmp_path, monkeypatch):
    _fake_ssh(tmp_path / "bin", blind="", unreachable="node-c")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-b slots=1\nnode-c slots=1\n")
    with pytest.raises(FolderNotSharedError, match=r"host node-c cannot be reached over ssh \(ssh: connect to host"):
        check_nodes_see(tmp_path, LauncherConfig(num_gpus=1, num_nodes=2, hostfile=str(hostfile)))


def test_launch_checks_the_nodes_before_it_starts_anything(tmp_path, monkeypatch):
    _fake_ssh(tmp_path / "bin", blind="node-c")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-b slots=1\nnode-c slots=1\n")
    started = tmp_path / "launcher-started"  # what the launcher command would leave
    monkeypatch.setattr(launch_mod, "build_launch_command", lambda *a, **k: ["touch", str(started)])
    out = tmp_path / "stage"
    out.mkdir()
    with pytest.raises(FolderNotSharedError, match=f"stage folder {out}: host node-c"):
        launch_mod.launch(out / "job.json", LauncherConfig(num_gpus=1, num_nodes=2, hostfile=str(hostfile),
                                                           launcher="deepspeed"), record_dir=out)
    assert not started.exists() and not (out / launch_mod.LAUNCHER_RECORD).exists()


def test_a_rank_that_cannot_read_its_job_file_names_its_host_and_the_folder(tmp_path, capsys):
    missing = tmp_path / "not-here" / "job.json"
    rc = job_entry_main(["--config", str(missing)], prog="sft_main", description="", job_name="SFTJob",
                        run_file=lambda path: pytest.fail("must not run"))
    err = capsys.readouterr().err
    assert rc == 2
    assert f"host {socket.gethostname()} cannot see the job file {missing}" in err
    assert f"(stage folder {missing.parent})" in err


def test_a_launched_job_gets_no_mlflow_variable(tmp_path, monkeypatch):
    """DeepSpeed's multi-node launcher writes every MLFLOW_* variable onto the pdsh command line (and its
    log): MLFLOW_TRACKING_PASSWORD showed in `ps` and the worker's log of the three-host test. A launched
    job never talks to MLflow, so none reaches it."""
    import sys

    monkeypatch.setattr(launch_mod, "build_launch_command", lambda *a, **k: [
        sys.executable, "-c", "import os; print('MLFLOW vars:', sorted(k for k in os.environ if k.startswith('MLFLOW')))"])
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "pw-of-launch-test", "MLFLOW_TRACKING_URI": "http://x:1",
           "PYTHONPATH": ""}
    lines: list[str] = []
    launch_mod.launch(tmp_path / "job.json", LauncherConfig(num_gpus=2, launcher="torchrun"), env=env,
                      on_line=lines.append)
    assert "MLFLOW vars: []" in lines, lines
