"""A one-node Slurm cluster for tests and benchmarks: munged, slurmctld and slurmd started here, stopped by pid.

Everything lives in one directory: the munge key and socket, ``slurm.conf`` (this machine as the
one node, its CPUs, most of its memory, no GPUs), the daemons' state, spool, logs and pid files.
Clients find the cluster through ``SLURM_CONF`` (see :meth:`OneNodeSlurm.env`). Needs Debian's
``slurm-wlm`` and ``munge`` (``.ci/run`` installs them) and root, as slurmd does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "scontrol")


def missing_programs() -> list[str]:
    """Programs the cluster needs that are not installed."""
    paths = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [name for name in DAEMONS if shutil.which(name, path=paths) is None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class OneNodeSlurm:
    """The cluster in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, cpus: int | None = None) -> None:
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname()
        self.conf = self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        """What a client needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _program(self, name: str) -> str:
        found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        assert found, f"{name} is not installed"
        return found

    def _write_config(self) -> None:
        root, user = self.root, os.environ.get("USER") or "root"
        lines = [
            "ClusterName=moekit-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge' / 'munge.sock'}",
            f"SlurmUser={user}",
            "SlurmdUser=root",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=1000",  # as most clusters set: a job that gives no --mem does not take the whole node
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb() * 3 // 4}",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and slurmd; return when the node is idle."""
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        os.chmod(munge, 0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        subprocess.run(
            [
                self._program("munged"), "--force", f"--socket={munge / 'munge.sock'}", f"--key-file={key}",
                f"--log-file={munge / 'munged.log'}", f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            check=True,
        )  # fmt: skip
        self._write_config()
        env = {**os.environ, **self.env()}
        subprocess.run([self._program("slurmctld"), "-i"], check=True, env=env)
        subprocess.run([self._program("slurmd")], check=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            if state.strip() == "idle":
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the test Slurm node did not become idle within {timeout} s: {self.logs()}")

    def logs(self) -> str:
        """The daemons' last log lines (for a failure message)."""
        out = []
        for path in (self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log"):
            if path.is_file():
                out.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop the daemons by their pid files (TERM, then KILL)."""
        pid_files = [self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        for pid_file in pid_files:
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            _end(pid)


def _end(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
