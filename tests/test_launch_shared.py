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
import sys
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
    monkeypatch.setattr(launch_mod, "build_launch_command", lambda *a, **k: [
        sys.executable, "-c", "import os; print('MLFLOW vars:', sorted(k for k in os.environ if k.startswith('MLFLOW')))"])
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "pw-of-launch-test", "MLFLOW_TRACKING_URI": "http://x:1",
           "PYTHONPATH": ""}
    lines: list[str] = []
    launch_mod.launch(tmp_path / "job.json", LauncherConfig(num_gpus=2, launcher="torchrun"), env=env,
                      on_line=lines.append)
    assert "MLFLOW vars: []" in lines, lines


# --------------------------------------------------------------------------------------------
# bounded waits (issue 23, item 4): a node whose link goes down ends the stage in bounded time


def test_the_folder_check_and_the_launchers_sessions_carry_keepalives_of_a_sixth_of_the_timeout(tmp_path, monkeypatch):
    """A session to a node whose link is down must not wait for TCP to give up: the folder check's ssh and
    every pdsh session of the deepspeed launcher get ServerAliveInterval = timeout / 6, three missed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "ssh-args"}\nexit 0\n')
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-b slots=1\nnode-c slots=1\n")
    launcher = LauncherConfig(num_gpus=1, num_nodes=2, hostfile=str(hostfile), launcher="deepspeed",
                              collective_timeout_s=30)
    seen: dict = {}

    def fake_command(*args, **kwargs):
        return [sys.executable, "-c", "import os; print(os.environ.get('PDSH_SSH_ARGS_APPEND'))"]

    monkeypatch.setattr(launch_mod, "build_launch_command", fake_command)
    out = tmp_path / "stage"
    out.mkdir()
    lines: list[str] = []
    launch_mod.launch(out / "job.json", launcher, record_dir=out, on_line=lines.append,
                      env={**os.environ, "PDSH_SSH_ARGS_APPEND": "-p 2222"})
    seen["pdsh"] = lines[-1]
    assert seen["pdsh"] == "-p 2222 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 -o ConnectTimeout=15"
    asked = (tmp_path / "ssh-args").read_text().splitlines()
    assert len(asked) == 2 and all("-o ServerAliveInterval=5 -o ServerAliveCountMax=3" in a for a in asked), asked


def test_torchrun_waits_for_the_other_nodes_no_longer_than_the_timeout(tmp_path):
    cmd = launch_mod.build_launch_command(tmp_path / "job.json", LauncherConfig(
        num_gpus=1, num_nodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29500, launcher="torchrun",
        collective_timeout_s=42.5))
    assert cmd[cmd.index("--rdzv-conf") + 1] == "timeout=43"


def test_a_rank_whose_peer_never_comes_fails_within_the_collective_timeout(tmp_path):
    """The engine's rendezvous (and every collective after it) gives up after
    ``launcher.collective_timeout_s``: rank 0 of 2 whose rank 1 never starts fails in about that time,
    not after torch's 30 minutes (or DeepSpeed's 10)."""
    import subprocess
    import time

    from colar_core.net import free_port

    code = (
        "import time, torch, deepspeed\n"
        "from colar_core.training.config import LauncherConfig, TrainConfig\n"
        "from colar_core.training.engines import DeepSpeedEngine\n"
        "cfg = TrainConfig(launcher=LauncherConfig(collective_timeout_s=3))\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    DeepSpeedEngine(torch.nn.Linear(2, 2), cfg)\n"
        "except Exception as err:\n"
        "    print(f'FAILED after {time.monotonic() - started:.1f} s: {type(err).__name__}', flush=True)\n"
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "FAILED after" in out.stdout, (out.stdout[-2000:], out.stderr[-3000:])
    waited = float(out.stdout.split("FAILED after ")[1].split(" s")[0])
    assert 2.5 <= waited <= 30, (waited, time.monotonic() - started, out.stdout[-500:])


_SUBGROUP_PEER = """
import sys, time, datetime, torch, deepspeed
import torch.distributed as dist
from colar_core.training.distributed import bound_collectives
rank, port, bound = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "bound"
if bound:
    bound_collectives(3)
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                        timeout=datetime.timedelta(seconds=3))
group = dist.new_group([0, 1])  # as DeepSpeed's ZeRO makes its data-parallel group: no timeout given
if rank == 1:
    time.sleep(60)
    sys.exit(0)
started = time.monotonic()
try:
    dist.all_reduce(torch.ones(2), group=group)
    print("returned", flush=True)
except Exception as err:
    print(f"FAILED after {time.monotonic() - started:.1f} s", flush=True)
"""


@pytest.mark.parametrize("bound", ["bound", pytest.param("torch-default", marks=pytest.mark.slow)])
def test_a_group_made_without_a_timeout_gives_up_after_the_collective_timeout(tmp_path, bound):
    """A group made later without a timeout (DeepSpeed's ZeRO data-parallel group) takes torch's module
    default (30 min for gloo) unless :func:`bound_collectives` set it: with it, rank 0's all-reduce on that
    group gives up about 3 s after its peer stopped taking part; without it, it is still waiting 20 s on (slow: that case only shows why)."""
    import subprocess

    from colar_core.net import free_port

    script = tmp_path / "peer.py"
    script.write_text(_SUBGROUP_PEER)
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    peer = subprocess.Popen([sys.executable, str(script), "1", port, bound], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        try:
            out = subprocess.run([sys.executable, str(script), "0", port, bound], env=env, capture_output=True,
                                 text=True, timeout=25)
            text = out.stdout
        except subprocess.TimeoutExpired as err:
            text = f"still waiting: {err.stdout!r}"
    finally:
        peer.kill()
        peer.wait()
    if bound == "bound":
        assert "FAILED after" in text, text
        assert float(text.split("FAILED after ")[1].split(" s")[0]) <= 10, text
    else:  # torch's own default: the reason bound_collectives exists (a change in torch would show here)
        assert "FAILED" not in text and "returned" not in text, text
