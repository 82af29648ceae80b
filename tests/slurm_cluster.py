"""A real one-node Slurm cluster on localhost for the launch tests: munged, slurmctld and slurmd.

Everything lives in one temporary directory: a fresh munge key, slurm.conf, state/spool dirs,
logs, pid files, and the munge socket (slurm.conf's AuthInfo points the auth and credential
plugins at it), so nothing in /etc is read or written and two clusters never meet. The daemons run
in the foreground as children of this process, and :meth:`SlurmCluster.stop` ends them by PID;
it also ends, by PID, any process whose environment names this cluster's SLURM_CONF (slurmstepd
and job processes that outlived a cancelled job), so a failing test leaves nothing behind.

Why these settings:
* ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no cgroups: containers and CI runners
  rarely give a writable cgroup tree; linuxproc tracks a step's processes through /proc.
* SelectType=select/cons_tres: what GPU clusters run (it understands --gpus-per-node).
* SlurmdParameters=config_overrides: the node is described with the CPU count and memory this
  machine really has, but slurmd must not drain it over a socket/core layout detail.
* JobRequeue=1: a job may requeue itself (the preemption test does exactly that).
* AuthInfo=...,cred_expire=5: a requeued job may start again only after the job credential's
  expiry (requeue_delay defaults to cred_expire, 120 s); 5 s keeps the requeue test short.
* SchedulerParameters=sched_interval=1: the main scheduling loop (60 s by default) starts a
  requeued job as soon as it is eligible.

Root is needed (slurmd starts jobs as the submitting user and slurmctld runs as SlurmUser=root
here); :func:`unavailable_reason` says why a cluster cannot be started, for ``pytest.skip``.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.multiproc import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
INSTALL_LOG = Path(os.environ.get("SLURM_INSTALL_LOG", "/tmp/megasft-slurm-install.log"))


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                       if p.exists()), None)


def unavailable_reason() -> Optional[str]:
    """None when a local cluster can be started here, else why not (the install log's verdict)."""
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        why = ""
        if INSTALL_LOG.exists():
            lines = [ln for ln in INSTALL_LOG.read_text(errors="replace").splitlines() if ln.startswith("install_slurm:")]
            why = f" ({lines[-1]})" if lines else ""
        return f"Slurm/MUNGE not installed: missing {', '.join(missing)}; run .ci/install_slurm.sh{why}"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts jobs as the submitting user)"
    return None


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        kb = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    return kb // 1024 - 256   # slurmd drains a node that reports less than configured


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (idempotent, safe after a failed start)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}
        self.cpus = os.cpu_count() or 1
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":
                del self.env[var]   # a test run inside a Slurm job must not leak its job into ours

    # ------------------------------------------------------------------ set-up
    def write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=megasft-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MessageTimeout=20
KillWait=20
MinJobAge=300
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self.write_config()
        m = self.root / "munge"
        # --force: munged refuses a key/socket directory it considers insecure (e.g. under a
        # world-writable /tmp); this key is throwaway and the socket dir is 0700 anyway.
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                               "--num-threads=2"])
        self._wait(lambda: self.socket.exists(), timeout, "munged socket")
        # -i: ignore state from a previous run (there is none: fresh dir); -D: foreground.
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self.run(["scontrol", "ping"]).stdout,
                   timeout, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait(lambda: self.node_state() in ("idle",), timeout, "node localhost idle")
        return self

    def _ok(self, argv: list[str]) -> bool:
        return self.run(argv, check=False).returncode == 0

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmError(f"{name} exited with {p.returncode} while waiting for {what}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    # ------------------------------------------------------------------ client
    def run(self, argv: list[str], check: bool = True, env: Optional[dict] = None, cwd=None
            ) -> subprocess.CompletedProcess:
        out = subprocess.run(argv, capture_output=True, text=True, env={**self.env, **(env or {})}, cwd=cwd,
                             timeout=60)
        if check and out.returncode:
            raise SlurmError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def node_state(self) -> str:
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return out.stdout.strip().rstrip("*~#$@+-").lower()

    def sbatch(self, argv: list[str], env: Optional[dict] = None, cwd=None) -> int:
        out = self.run(["sbatch", "--parsable", *argv], env=env, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_state(self, job_id: int, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n{self.logs()}")

    def logs(self, tail: int = 25) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld, munged by PID, then end stragglers by PID."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", str(os.getuid())], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if out.returncode or not out.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for pid in self.stragglers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stragglers(self) -> list[int]:
        """PIDs of live processes whose environment carries this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes() + b"\0":
                    found.append(int(d.name))
            except OSError:
                continue
        return found
