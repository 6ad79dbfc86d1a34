"""A real SLURM cluster on this machine (one node, or several) that a test starts and stops by itself.

    with local_slurm(tmp_path) as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env, check=True)

`local_slurm` starts, as child processes of the test and in the foreground, MUNGE (authentication), a MariaDB
server and `slurmdbd` (job accounting, so that `sacct` and `sacctmgr` answer as on a real cluster: the Snakemake
SLURM executor polls job states with `sacct` and checks the account with `sacctmgr`), then `slurmctld` and one
`slurmd` for this machine (or several, each its own node: `nodes=2` makes a two-node cluster on one machine, for
multi-node jobs); it registers an account for the current user and waits until `sinfo` shows the nodes
idle. On exit it cancels what is still queued and stops every daemon (and any job process left over), also when
the start or the test failed. Everything (keys, sockets, configs, database, state, spool, logs) lives under `root`;
`cluster.env` (SLURM_CONF, and PATH with wrappers of the client commands, see _write_client_wrappers) points
`sbatch`, `sacct`, `snakemake --executor slurm` ... at it.

Needs Debian's `slurmctld`, `slurmd`, `slurmdbd`, `munge` and `mariadb-server` packages (bookworm: SLURM 22.05.8,
MariaDB 10.11) and root (slurmd starts jobs as their user). Without `slurmctld` the test is skipped; any other
missing piece is an error. With `accounting=False` only MUNGE, slurmctld and slurmd are started (in ~1 s instead
of ~10 s): `sacct` then answers "Slurm accounting storage is disabled", and only `squeue` knows job states (for
jobs finished less than MinJobAge, 300 s, ago).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

CLUSTER = "tiny"
PARTITION = "debug"
ACCOUNT = "tinygpt"
START_TIMEOUT = 60.0  # seconds for each daemon to answer; generous, as tests share a loaded 2-core machine
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
# Program -> Debian package (bookworm: slurm-wlm 22.05.8, munge 0.5.15, mariadb-server 10.11).
REQUIRED = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sinfo": "slurm-client"}
ACCOUNTING_REQUIRED = {"slurmdbd": "slurmdbd", "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server"}
CLIENT_COMMANDS = (
    "sbatch", "srun", "salloc", "squeue", "scancel", "scontrol", "sinfo", "sacct", "sacctmgr", "sshare", "sstat",
)


class SlurmStartError(RuntimeError):
    """A daemon did not come up; the message ends with the daemons' log tails."""


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # os.environ without inherited SLURM_* variables, plus SLURM_CONF
    partition: str = PARTITION
    account: str = ACCOUNT
    cluster_name: str = CLUSTER
    node: str = ""  # the first (or only) node
    nodes: list[str] = field(default_factory=list)
    accounting: bool = True
    startup_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(self, *args: str, check: bool = True, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
        """Run a client command (sbatch, sacct, ...) against this cluster; output as text."""
        result = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
                f"\n{self.log_tails()}"
            )
        return result

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(tail))
        return "\n".join(parts)


def find_program(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin folders a non-root PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(name, path=path)


@contextlib.contextmanager
def local_slurm(root: Path, accounting: bool = True, nodes: int = 1) -> Iterator[SlurmCluster]:
    """Start a SLURM cluster under `root` (a fresh folder, best a short path: sockets live there) with `nodes`
    nodes on this machine: one is this host; several are `<host>1`, `<host>2` ..., one slurmd each (on its own
    port, with its own spool folder), every one with all of this machine's CPUs and memory."""
    if find_program("slurmctld") is None:
        import pytest

        pytest.skip("slurmctld is not installed (apt-get install slurmctld slurmd slurmdbd munge mariadb-server)")
    root = Path(root).resolve()
    for sub in ("bin", "etc", "munge", "run", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # A Unix socket path has at most 107 bytes.
    if len(str(root / "munge" / "munge.socket")) > 100:
        raise ValueError(f"{root} is too long a path for the MUNGE socket; use a shorter folder")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(root / "etc" / "slurm.conf")
    env["PATH"] = os.pathsep.join([str(root / "bin"), env.get("PATH", ""), *SBIN_DIRS])
    host = socket.gethostname().split(".")[0]
    names = [host] if nodes == 1 else [f"{host}{i}" for i in range(1, nodes + 1)]
    cluster = SlurmCluster(root=root, env=env, node=names[0], nodes=names, accounting=accounting)
    start = time.monotonic()
    try:
        _start(cluster)
        cluster.startup_seconds = time.monotonic() - start
        yield cluster
    finally:
        _stop(cluster)


# --- starting -----------------------------------------------------------------------------------------------


def _check_installed(accounting: bool) -> None:
    needed = dict(REQUIRED, **(ACCOUNTING_REQUIRED if accounting else {}))
    missing = {program: package for program, package in needed.items() if find_program(program) is None}
    if missing:
        raise SlurmStartError(
            f"missing {', '.join(missing)}: apt-get install {' '.join(sorted(set(missing.values())))}"
        )


def _start(c: SlurmCluster) -> None:
    _check_installed(c.accounting)
    user = getpass.getuser()
    ports = _free_ports(4 + len(c.nodes))  # slurmctld, slurmd (one node), MariaDB, slurmdbd, then one per node
    munge_socket = c.root / "munge" / "munge.socket"
    _write_munge_key(c.root / "munge" / "munge.key")
    _spawn(c, "munged", [
        find_program("munged"), "--foreground", "--force", "--num-threads=4",
        f"--socket={munge_socket}", f"--key-file={c.root / 'munge' / 'munge.key'}",
        f"--log-file={c.root / 'munge' / 'munged.log'}", f"--pid-file={c.root / 'run' / 'munged.pid'}",
        f"--seed-file={c.root / 'munge' / 'munged.seed'}",
    ])
    _wait(c, "munged", lambda: munge_socket.exists())

    Path(c.env["SLURM_CONF"]).write_text(_slurm_conf(c, user, munge_socket, ports))
    _write_client_wrappers(c)
    if c.accounting:
        _start_accounting(c, user, munge_socket, db_port=ports[2], dbd_port=ports[3])

    _spawn(c, "slurmctld", [find_program("slurmctld"), "-D"])
    for node in c.nodes:
        (c.root / "spool" / node).mkdir(exist_ok=True)
        _spawn(c, "slurmd" if len(c.nodes) == 1 else f"slurmd-{node}", [find_program("slurmd"), "-D", "-N", node])
    _wait(c, "the nodes to be idle", lambda: all(_node_state(c, node) == "idle" for node in c.nodes))


def _slurm_conf(c: SlurmCluster, user: str, munge_socket: Path, ports: list[int]) -> str:
    accounting = (
        f"AccountingStorageType=accounting_storage/slurmdbd\n"
        f"AccountingStorageHost=localhost\n"
        f"AccountingStoragePort={ports[3]}\n"
        # The MUNGE socket for slurmdbd connections (AuthInfo is only read for the other ones).
        f"AccountingStoragePass={munge_socket}\n"
        f"AccountingStorageEnforce=associations\n"
        f"AccountingStoreFlags=job_comment\n"  # sacct shows the comment (the Snakemake plugin's rule_<name>)
        if c.accounting
        else "AccountingStorageType=accounting_storage/none\n"
    )
    return f"""\
ClusterName={CLUSTER}
SlurmctldHost={socket.gethostname().split(".")[0]}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
StateSaveLocation={c.root / 'state'}
SlurmdSpoolDir={c.root / 'spool' / '%n'}
SlurmctldPidFile={c.root / 'run' / 'slurmctld.pid'}
SlurmdPidFile={c.root / 'run' / 'slurmd.%n.pid'}
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
ReturnToService=2
{accounting}
{_node_lines(c, ports[4:])}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _start_accounting(c: SlurmCluster, user: str, munge_socket: Path, db_port: int, dbd_port: int) -> None:
    """MariaDB (a fresh data folder, root without password, TCP on localhost), slurmdbd, the account."""
    data = c.root / "db"
    install = subprocess.run(
        [find_program("mariadb-install-db"), "--no-defaults", f"--datadir={data}", f"--user={user}",
         "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
        capture_output=True, text=True, timeout=120,
    )
    if install.returncode != 0:
        raise SlurmStartError(f"mariadb-install-db failed:\n{install.stdout}\n{install.stderr}")
    _spawn(c, "mariadbd", [
        find_program("mariadbd"), "--no-defaults", f"--datadir={data}", f"--user={user}",
        f"--socket={c.root / 'run' / 'mariadb.sock'}", "--bind-address=127.0.0.1", f"--port={db_port}",
        f"--pid-file={c.root / 'run' / 'mariadbd.pid'}",
        "--skip-name-resolve", "--innodb-use-native-aio=0", "--innodb-buffer-pool-size=64M",
        "--innodb-lock-wait-timeout=900",
    ])
    _wait(c, "mariadbd", lambda: _port_open(db_port))

    dbd_conf = c.root / "etc" / "slurmdbd.conf"  # slurmdbd reads it next to SLURM_CONF
    dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser={user}
PidFile={c.root / 'run' / 'slurmdbd.pid'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
""")
    dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
    _spawn(c, "slurmdbd", [find_program("slurmdbd"), "-D"])
    _wait(c, "slurmdbd", lambda: _port_open(dbd_port))
    # The cluster must be known to slurmdbd before slurmctld registers; the account is the one jobs use.
    c.run("sacctmgr", "-i", "add", "cluster", CLUSTER)
    c.run("sacctmgr", "-i", "add", "account", ACCOUNT, f"cluster={CLUSTER}", "description=tests", "organization=tests")
    c.run("sacctmgr", "-i", "add", "user", user, f"account={ACCOUNT}", f"defaultaccount={ACCOUNT}")


def _write_client_wrappers(c: SlurmCluster) -> None:
    """`bin/srun` etc. (first on cluster.env's PATH): the client commands with SLURM_CONF defaulting to ours.

    On a real cluster the clients find /etc/slurm/slurm.conf without SLURM_CONF; ours lives in a temporary
    folder, and snakemake-executor-plugin-slurm-jobstep 0.6.1 drops every SLURM_* variable but the job's
    identity (SLURM_CONF included) before its `srun`, which then fails with "Could not establish a
    configuration source". The wrappers stand in for the default config location.
    """
    for name in CLIENT_COMMANDS:
        program = find_program(name)
        if program is not None:
            wrapper = c.root / "bin" / name
            wrapper.write_text(
                f'#!/bin/sh\n: "${{SLURM_CONF:={c.env["SLURM_CONF"]}}}"\nexport SLURM_CONF\nexec {program} "$@"\n'
            )
            wrapper.chmod(0o755)


def _write_munge_key(path: Path) -> None:
    path.parent.chmod(0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))


def _node_hardware() -> str:
    """The node's CPUs, sockets, cores and memory as slurmd detects them (`slurmd -C`); configuring more would
    drain the node, less makes slurmd complain."""
    out = subprocess.run([find_program("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    fields = [item for item in out.stdout.split() if item.split("=")[0] in keys]
    return " ".join(fields) or f"CPUs={os.cpu_count() or 1} RealMemory=1024"


def _spawn(c: SlurmCluster, name: str, argv: list[str]) -> None:
    out = open(c.log_dir / f"{name}.log", "wb")  # in the foreground, each daemon logs to stderr
    # Own session, so stopping it reaches its helpers (slurmctld's slurmscriptd) too.
    c._procs[name] = subprocess.Popen(
        argv, env=c.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    out.close()


def _wait(c: SlurmCluster, what: str, ready, timeout: float | None = None) -> None:
    timeout = START_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in c._procs.items():
            if proc.poll() is not None:
                raise SlurmStartError(
                    f"{name} exited with {proc.returncode} while waiting for {what}\n{c.log_tails()}"
                )
        if ready():
            return
        if time.monotonic() > deadline:
            raise SlurmStartError(f"timed out after {timeout:.0f} s waiting for {what}\n{c.log_tails()}")
        time.sleep(0.2)


def _node_lines(c: SlurmCluster, ports: list[int]) -> str:
    """NodeName lines: one node on SlurmdPort, or several on this host, each on its own port (slurmd -N)."""
    hardware = _node_hardware()
    if len(c.nodes) == 1:
        return f"NodeName={c.node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN"
    host = socket.gethostname().split(".")[0]
    return "\n".join(
        f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hardware} State=UNKNOWN"
        for node, port in zip(c.nodes, ports)
    )


def _node_state(c: SlurmCluster, node: str) -> str:
    try:
        out = subprocess.run(
            ["sinfo", "--noheader", "--node", node, "--format=%t"],
            env=c.env, capture_output=True, text=True, timeout=10,
        )
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- stopping -----------------------------------------------------------------------------------------------


def _stop(c: SlurmCluster) -> None:
    """Cancel jobs, stop the daemons in reverse start order, then kill any process still tied to this cluster."""
    if "slurmctld" in c._procs and c._procs["slurmctld"].poll() is None:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "--user", getpass.getuser()], env=c.env,
                           capture_output=True, timeout=10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and subprocess.run(
                ["squeue", "--noheader", "--states=running,completing,configuring"],
                env=c.env, capture_output=True, text=True, timeout=10,
            ).stdout.strip():
                time.sleep(0.2)
    for name in reversed(list(c._procs)):
        _terminate(c._procs[name])
    # Job steps (slurmstepd and the job's processes) are daemonized by slurmd, so they are neither its children
    # nor in its session; they are recognised by our SLURM_CONF in their environment.
    leftovers = _pids_with_env("SLURM_CONF=" + c.env["SLURM_CONF"])
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in leftovers):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the daemon's process group (it leads its own session), SIGKILL to what is left after `grace`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _group_members(proc.pid):
        proc.poll()  # reap the daemon itself; its process group id stays taken while helpers live
        time.sleep(0.1)
    if _group_members(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def _pids_with_env(entry: str) -> list[int]:
    needle = entry.encode() + b"\0"
    own = os.getpid()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == own:
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ:
            pids.append(int(proc.name))
    return pids
