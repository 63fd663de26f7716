"""Three hosts on one machine, for tests of colar across hosts: network namespaces joined by a bridge.

Topology (all made by :class:`Cluster`, all removed by its ``close``, on failure too)::

    root namespace = host A: bridge colbr<pid>-<i>, address 10.213.X.1/24 (the servers bind it)
        |-- veth --> namespace colart-<pid>-<i>b = host B: eth0 10.213.X.2/24, lo
        `-- veth --> namespace colart-<pid>-<i>c = host C: eth0 10.213.X.3/24, lo

``10.213.X.0/24`` is a subnet the test picks where this machine has no address and no route, so its
only hosts are the test's. B and C have no other interface and no route beyond the subnet: whatever
runs there can reach A, each other and their own loopback, and nothing else (a connect elsewhere
fails with "network unreachable"). IPv6 is off on every interface the test makes.

Host A is the root namespace's side of the bridge, not a namespace of its own: the servers there reach
the machine's PostgreSQL on 127.0.0.1 (which listens on the root namespace's loopback only) as they
would on a real host with a local database, and bind only A's test address. B and C run their
commands through ``ip netns exec`` and ``unshare --uts`` with a host name of their own
(``colart-<pid>-<i>b``), so what records a host name (a launcher record, a process identity) tells the
hosts apart, as it would on separate machines. The three share one filesystem: a folder is "shared
storage" (what NFS would be across machines) by being the same path.

Names and ssh (``Cluster(..., ssh=True)``): each namespace gets files of its own through iproute2's
convention (``ip netns exec`` bind-mounts ``/etc/netns/<ns>/*`` over ``/etc``): an ``/etc/hosts`` naming
the hosts, and an ``/etc/ssh`` with a host key, a root login key and an ``sshd_config`` made by the
test. Debian's ``sshd`` then runs in B and C, bound to their subnet address, accepting that key only;
``ssh``/``pdsh`` from B or C reach either (known hosts: the test's host keys). This is what DeepSpeed's
multi-node launcher needs (it starts each node's processes over pdsh/ssh). ``hidden[name]``
(``work/hidden-from-c`` for C) is a folder that the ssh sessions on that host do not see (its sshd runs
with an empty tmpfs mounted over it), while every other process of every host does: storage that is
not shared with that host, as a folder on another machine's local disk would be.

Processes started with :meth:`Cluster.popen` run in sessions of their own and are stopped by ``close``
(SIGTERM, then SIGKILL), and so is anything still left in B's or C's namespace. Namespaces, veths and
bridge of an earlier run that was killed before it could clean up (its pid, in their names, is gone)
are removed by the next :class:`Cluster`.

Needs root and iproute2 (``ip netns``); :func:`require_cluster_support` skips the test, saying why,
where they are missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Sequence

import pytest

#: Where the test subnet is picked from: the first free /24 of it.
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
# Names (of cluster number I in process PID): namespaces colart-PID-Ib, bridge colbrPID-I, veths colvPID-Ib
# (their peers colvPID-Ibp, renamed eth0 in the namespace); at most 15 characters, as links must be.
_PREFIX = "colart"
_NS_NAME = re.compile(rf"^{_PREFIX}-(\d+)-\d[a-z]$")
_LINK_NAME = re.compile(r"^(?:colbr|colv)(\d+)-\d(?:[a-z]p?)?$")
_COUNT = itertools.count()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def require_cluster_support() -> None:
    """Skip (saying why) unless this process is root and ``ip netns`` works."""
    if os.geteuid() != 0:
        pytest.skip("the three-host tests make network namespaces and veth pairs: they need root")
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("the three-host tests need iproute2's `ip` and util-linux's `unshare` (Debian: iproute2)")
    probe = f"{_PREFIX}-{os.getpid()}-probe"  # not a name remove_stale() takes
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "del", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` does not work here: {made.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces and links an earlier :class:`Cluster` left when its process was killed (the
    pid in their names is gone); returns their names. Names of live processes are left alone."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_namespace_processes(name, grace_s=2.0)
            if _ip("netns", "del", name, check=False).returncode == 0:
                removed.append(name)
    for etc in Path("/etc/netns").glob(f"{_PREFIX}-*"):  # a stale namespace's hosts file and /etc/ssh
        m = _NS_NAME.match(etc.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(etc, ignore_errors=True)
            removed.append(str(etc))
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        m = _LINK_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            if _ip("link", "del", name, check=False).returncode == 0:
                removed.append(name)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network this machine has an address in or a route to (any table)."""
    nets = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        m = re.search(r"\binet (\S+)", line)
        if m:
            nets.append(ipaddress.ip_interface(m.group(1)).network)
    for line in _ip("-4", "route", "show", "table", "all").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first in ("default", "broadcast", "local", "unreachable", "blackhole", "prohibit", "throw"):
            first = line.split()[1] if first != "default" and len(line.split()) > 1 else ""
        with contextlib.suppress(ValueError):
            if first:
                nets.append(ipaddress.ip_network(first, strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of :data:`SUBNET_POOL` that overlaps no address or route of this machine."""
    used = _used_networks()
    for candidate in SUBNET_POOL.subnets(new_prefix=24):
        if candidate.network_address.packed[2] == 0:
            continue  # 10.213.0.0/24: left alone, a likely pick of anyone else
        if not any(candidate.overlaps(n) for n in used if n.prefixlen > 0):
            return candidate
    raise RuntimeError(f"no free /24 in {SUBNET_POOL} on this machine")


def _write_sysctl(path: str, value: str, netns: Optional[str] = None) -> None:
    """Write /proc/sys/``path`` (in ``netns`` if given); silently skipped where the knob does not exist."""
    cmd = ["sh", "-c", f"[ -w /proc/sys/{path} ] && echo {value} > /proc/sys/{path} || true"]
    subprocess.run(["ip", "netns", "exec", netns, *cmd] if netns else cmd, check=False, timeout=30,
                   capture_output=True)


def _kill_namespace_processes(netns: str, grace_s: float) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``, every process in ``netns`` (only ever one of ours)."""
    def pids() -> list[int]:
        out = _ip("netns", "pids", netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        left = pids()
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.2)


@dataclass
class Host:
    """One test host: its name (``A``, ``B``, ``C``), its address on the test subnet and its namespace
    (None for A, the root namespace)."""

    name: str
    address: str
    netns: Optional[str] = None
    hostname: str = field(default_factory=socket.gethostname)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` as it runs on this host: in its namespace, under its own host name."""
        if self.netns is None:
            return list(cmd)
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname, *cmd]


@dataclass(frozen=True)
class Listener:
    """A listening socket as ``ss`` shows it."""

    proto: str
    address: str  # "0.0.0.0", "::", "*" for every address
    port: int
    pids: tuple[int, ...]
    line: str

    @property
    def wildcard(self) -> bool:
        return self.address in ("*", "0.0.0.0", "::")


def parse_ss(text: str) -> list[Listener]:
    """The listening sockets of ``ss -H -l -n -t -u -p`` output."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        proto, local = parts[0], parts[4]
        address, _, port = local.rpartition(":")
        address = address.strip("[]").split("%")[0]
        pids = tuple(int(p) for p in re.findall(r"pid=(\d+)", line))
        if port.isdigit():
            out.append(Listener(proto, address, int(port), pids, line.strip()))
    return out


class Cluster:
    """Hosts A (root namespace, the bridge's address), B and C (namespaces) on a fresh subnet; a context
    manager that removes everything it made on exit. ``work``: where host folders and logs go."""

    def __init__(self, work: Path, names: Sequence[str] = ("B", "C"), *, ssh: bool = False,
                 hide_from: Sequence[str] = ("C",)):
        self.work = Path(work)
        self.ssh = ssh
        self.hidden = {name: self.work / f"hidden-from-{name.lower()}" for name in hide_from} if ssh else {}
        self.tag = f"{os.getpid()}-{next(_COUNT) % 10}"
        self.bridge = f"colbr{self.tag}"
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self.hosts: dict[str, Host] = {}
        self._names = list(names)
        self._veths: list[str] = []
        self._procs: list[tuple[subprocess.Popen, Optional[IO]]] = []
        self._made_bridge = False
        self._made_etc_netns = False
        self._made_run_sshd = False

    # ---------------------------------------------------------------- set up / tear down

    def __enter__(self) -> "Cluster":
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_up(self) -> None:
        remove_stale()
        self.subnet = free_subnet()
        addresses = list(self.subnet.hosts())
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        _write_sysctl(f"net/ipv6/conf/{self.bridge}/disable_ipv6", "1")
        _ip("addr", "add", f"{addresses[0]}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.hosts["A"] = Host("A", str(addresses[0]))
        for i, name in enumerate(self._names, start=1):
            low = name.lower()
            ns, veth, peer = f"{_PREFIX}-{self.tag}{low}", f"colv{self.tag}{low}", f"colv{self.tag}{low}p"
            _ip("netns", "add", ns)
            self.hosts[name] = Host(name, str(addresses[i]), ns, hostname=ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            self._veths.append(veth)
            _write_sysctl(f"net/ipv6/conf/{veth}/disable_ipv6", "1")
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _write_sysctl("net/ipv6/conf/all/disable_ipv6", "1", netns=ns)
            _write_sysctl("net/ipv6/conf/default/disable_ipv6", "1", netns=ns)
            _ip("-n", ns, "link", "set", peer, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{addresses[i]}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self._write_etc()
        self.check_links()
        if self.ssh:
            self._start_sshd()

    def close(self) -> None:
        """Stop every process this cluster started and everything left in its namespaces; delete the
        namespaces, veths and bridge. Safe to call twice, and after a failed set-up."""
        for proc, log in self._procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for proc, log in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
            if log is not None:
                log.close()
        self._procs.clear()
        for host in self.hosts.values():
            if host.netns:
                _kill_namespace_processes(host.netns, grace_s=5.0)
        for host in list(self.hosts.values()):
            if host.netns:
                _ip("netns", "del", host.netns, check=False)
                shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
        for veth in self._veths:
            _ip("link", "del", veth, check=False)  # usually gone with its namespace's end
        self._veths.clear()
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)
            self._made_bridge = False
        for made, folder in ((self._made_etc_netns, "/etc/netns"), (self._made_run_sshd, "/run/sshd")):
            if made:
                with contextlib.suppress(OSError):  # only if empty: another user's files stay
                    Path(folder).rmdir()
        self._made_etc_netns = self._made_run_sshd = False
        self.hosts.clear()

    def _write_etc(self) -> None:
        """``/etc/netns/<ns>/hosts`` for B and C (ssh: also ``/etc/netns/<ns>/ssh``)."""
        names = {h.address: h.hostname for h in self.hosts.values() if h.netns is not None}
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in names.items())
        self._made_etc_netns = self._made_etc_netns or not Path("/etc/netns").exists()
        for host in self.hosts.values():
            if host.netns is None:
                continue
            etc = Path("/etc/netns") / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
        if not self.ssh:
            return
        keys = self.work / "ssh-keys"
        keys.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "colar-test", "-f", str(keys / "login")],
                       check=True, timeout=60)
        known = []
        for host in self.hosts.values():
            if host.netns is None:
                continue
            etc_ssh = Path("/etc/netns") / host.netns / "ssh"
            etc_ssh.mkdir(mode=0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.hostname, "-f",
                            str(etc_ssh / "ssh_host_ed25519_key")], check=True, timeout=60)
            pub = (etc_ssh / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{host.hostname},{host.address} {pub[0]} {pub[1]}\n")
        for host in self.hosts.values():
            if host.netns is None:
                continue
            etc_ssh = Path("/etc/netns") / host.netns / "ssh"
            shutil.copy(keys / "login", etc_ssh / "login_key")
            os.chmod(etc_ssh / "login_key", 0o600)
            (etc_ssh / "authorized_keys").write_text((keys / "login.pub").read_text())
            (etc_ssh / "known_hosts").write_text("".join(known))
            (etc_ssh / "sshd_config").write_text("\n".join([
                "# made by tests/cluster.py: root logs in with the test's key only, on the test subnet only",
                f"ListenAddress {host.address}", "Port 22", "HostKey /etc/ssh/ssh_host_ed25519_key",
                "AuthorizedKeysFile /etc/ssh/authorized_keys", "PermitRootLogin prohibit-password",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
                "X11Forwarding no", "PrintMotd no", "PidFile none",
                # a session whose client went away (its link down) ends after 3 unanswered probes, 5 s apart,
                # rather than when TCP gives up (deployments/README.md recommends the same on real nodes)
                "ClientAliveInterval 5", "ClientAliveCountMax 3", ""]))
            (etc_ssh / "ssh_config").write_text("\n".join([
                "# made by tests/cluster.py", "Host *", "  User root", "  IdentityFile /etc/ssh/login_key",
                "  IdentitiesOnly yes", "  UserKnownHostsFile /etc/ssh/known_hosts", "  StrictHostKeyChecking yes",
                "  BatchMode yes", "  ConnectTimeout 10", ""]))

    def _start_sshd(self) -> None:
        """Debian's sshd in B and C (``/etc/ssh`` of their own, :meth:`_write_etc`); waits until each
        answers ssh from the other."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise RuntimeError("sshd is not installed (Debian: apt-get install openssh-server pdsh)")
        if not Path("/run/sshd").exists():  # its privilege-separation folder (removed again by close)
            Path("/run/sshd").mkdir(mode=0o755)
            self._made_run_sshd = True
        names = [n for n, h in self.hosts.items() if h.netns is not None]
        for name in names:
            cmd = [sshd, "-D", "-e", "-f", "/etc/ssh/sshd_config"]
            if name in self.hidden:  # its ssh sessions see an empty tmpfs there
                self.hidden[name].mkdir(parents=True, exist_ok=True)
                cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount -t tmpfs colar-hidden "$0" && exec "$@"', str(self.hidden[name]), *cmd]
            self.popen(name, cmd, self.work / name / "sshd.log")
        for src, dst in zip(names, names[1:] + names[:1]):
            deadline, out = time.monotonic() + 30, None
            while time.monotonic() < deadline:
                out = self.run(src, ["ssh", self.hosts[dst].hostname, "hostname"], timeout=30)
                if out.returncode == 0:
                    break
                time.sleep(0.5)
            assert out is not None and out.returncode == 0 and out.stdout.strip() == self.hosts[dst].hostname, \
                (src, dst, out and out.stderr, (self.work / dst / "sshd.log").read_text(errors="replace")[-2000:])

    def leftovers(self) -> list[str]:
        """What of this cluster still exists (namespaces, links, ``/etc/netns`` folders): empty after
        :meth:`close`."""
        names = {line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()}
        names |= {p.name for p in Path("/etc/netns").glob(f"{_PREFIX}-*")}
        links = {line.split(":", 2)[1].strip().split("@")[0]
                 for line in _ip("-o", "link", "show", check=False).stdout.splitlines() if line.count(":") >= 2}
        mine = re.compile(rf"^({_PREFIX}-{self.tag}[a-z]|colbr{self.tag}|colv{self.tag}[a-z]p?)$")
        return sorted(n for n in names | links if mine.match(n))

    # ---------------------------------------------------------------- commands

    def run(self, host: str, cmd: Sequence[str], *, env: Optional[dict] = None, timeout: float = 120.0,
            cwd: Optional[Path] = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``cmd`` on ``host`` to its end; its output captured as text."""
        return subprocess.run(self.hosts[host].argv(cmd), env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def python(self, host: str, code: str, *, env: Optional[dict] = None, timeout: float = 120.0
               ) -> subprocess.CompletedProcess:
        """Run the Python ``code`` on ``host`` (this interpreter)."""
        return self.run(host, [sys.executable, "-c", code], env=env, timeout=timeout)

    def popen(self, host: str, cmd: Sequence[str], log_path: Path, *, env: Optional[dict] = None,
              cwd: Optional[Path] = None) -> subprocess.Popen:
        """Start ``cmd`` on ``host`` in a session of its own, output to ``log_path``; stopped by :meth:`close`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # noqa: SIM115 - closed by close()
        proc = subprocess.Popen(self.hosts[host].argv(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs.append((proc, log))
        return proc

    # ---------------------------------------------------------------- faults

    def set_link(self, host: str, up: bool) -> None:
        """Take ``host``'s link down (its veth's end on the bridge, as a cable pulled: packets to and from
        the host are dropped, nothing answers a refusal) or bring it back up."""
        _ip("link", "set", f"colv{self.tag}{host.lower()}", "up" if up else "down")

    @contextlib.contextmanager
    def dropping(self, host: str, address: str, port: int):
        """While the block runs, every TCP packet from ``host`` to ``address:port`` is dropped (an
        nftables table of the host's namespace): from that host the server is unreachable, its
        connections time out, while every other host still reaches it."""
        netns = self.hosts[host].netns
        assert netns is not None, "a drop rule is set in a namespace host (B, C)"
        nft = ["ip", "netns", "exec", netns, "nft"]
        table = f"colar_drop_{port}"
        subprocess.run([*nft, "add", "table", "inet", table], check=True, timeout=30)
        try:
            subprocess.run([*nft, "add", "chain", "inet", table, "out",
                            "{ type filter hook output priority 0; }"], check=True, timeout=30)
            subprocess.run([*nft, "add", "rule", "inet", table, "out", "ip", "daddr", address, "tcp", "dport",
                            str(port), "drop"], check=True, timeout=30)
            yield
        finally:
            subprocess.run([*nft, "delete", "table", "inet", table], check=False, timeout=30)

    def namespace_processes(self, host: str) -> dict[int, str]:
        """``{pid: command line}`` of every process in ``host``'s namespace (B, C)."""
        netns = self.hosts[host].netns
        assert netns is not None
        out = _ip("netns", "pids", netns, check=False).stdout.split()
        found = {}
        for pid in out:
            try:
                found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
            except OSError:
                continue
        return found

    # ---------------------------------------------------------------- checks

    def interfaces(self, host: str) -> dict[str, list[str]]:
        """``{interface: [address/prefix, ...]}`` of a namespace host (IPv4 and IPv6)."""
        out: dict[str, list[str]] = {}
        text = self.run(host, ["ip", "-o", "addr", "show"], check=True).stdout
        for line in text.splitlines():
            parts = line.split()
            out.setdefault(parts[1], []).append(parts[3])
        return out

    def listeners(self, host: str) -> list[Listener]:
        """The listening TCP and UDP sockets of ``host``'s namespace (A: the root namespace: everything on
        the machine, filter by pid)."""
        return parse_ss(self.run(host, ["ss", "-H", "-l", "-n", "-t", "-u", "-p"], check=True).stdout)

    def allowed(self, host: str, listener: Listener) -> bool:
        """Whether ``listener`` is on loopback or the test subnet. A wildcard counts only on B and C,
        whose only interfaces are ``lo`` and the subnet's (:meth:`check_links`)."""
        if listener.wildcard:
            return self.hosts[host].netns is not None
        try:
            address = ipaddress.ip_address(listener.address)
        except ValueError:
            return False
        assert self.subnet is not None
        return address.is_loopback or address in self.subnet

    def check_links(self) -> None:
        """B and C have ``lo`` and ``eth0`` on the subnet only, no route beyond it, and reach A and each
        other over TCP (a bridge that filters would fail here, not in the middle of a test)."""
        assert self.subnet is not None
        for name, host in self.hosts.items():
            if host.netns is None:
                continue
            addrs = self.interfaces(name)
            assert set(addrs) == {"lo", "eth0"}, addrs
            assert all(ipaddress.ip_interface(a).ip in self.subnet for a in addrs["eth0"]), addrs
            routes = self.run(name, ["ip", "-4", "route", "show"], check=True).stdout.strip().splitlines()
            assert all(not r.startswith("default") for r in routes), routes
        names = [n for n, h in self.hosts.items() if h.netns is not None]
        for src in names:
            self._tcp_check(src, "A")
        for src, dst in zip(names, names[1:] + names[:1]):
            if src != dst:
                self._tcp_check(src, dst)

    def _tcp_check(self, src: str, dst: str, port: int = 0) -> None:
        """A TCP connection from ``src`` to ``dst``'s subnet address carries a few bytes."""
        target = self.hosts[dst]
        if target.netns is None:
            server = socket.create_server((target.address, 0))
            port = server.getsockname()[1]
            got: list[bytes] = []

            def accept() -> None:
                server.settimeout(20)
                with contextlib.suppress(OSError):
                    conn, _ = server.accept()
                    with conn:
                        got.append(conn.recv(16))

            t = threading.Thread(target=accept, daemon=True)
            t.start()
            sent = self.python(src, f"import socket; socket.create_connection(('{target.address}', {port}), "
                               "timeout=10).sendall(b'ping')", timeout=30)
            t.join(25)
            server.close()
            assert sent.returncode == 0 and got == [b"ping"], (src, dst, sent.stderr, got)
            return
        listener = subprocess.Popen(
            target.argv([sys.executable, "-c",
                         "import socket,sys; s=socket.create_server((sys.argv[1],0)); print(s.getsockname()[1],"
                         " flush=True); s.settimeout(20); c,_=s.accept(); print(c.recv(16).decode(), flush=True)",
                         target.address]),
            stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout is not None
            port = int(listener.stdout.readline())
            sent = self.python(src, f"import socket; socket.create_connection(('{target.address}', {port}), "
                               "timeout=10).sendall(b'ping')", timeout=30)
            out, _ = listener.communicate(timeout=25)
            assert sent.returncode == 0 and out.strip() == "ping", (src, dst, sent.stderr, out)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait()
