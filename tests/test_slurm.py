"""`sbatch launch/sft_405b.sh` on a real one-node Slurm cluster (munged + slurmctld + slurmd on
localhost, tests/slurm_cluster.py), with the tiny chat config on CPU: 4 gloo ranks (its layout).

* The uninterrupted job trains, writes its per-node log, metrics and final checkpoint (`latest`).
* A job sent SIGUSR1 mid-run, first to the batch shell (what `--signal=B:USR1@...` does before the
  time limit), then after its restart straight to its step, stops at a step boundary and saves
  each time, requeues itself, resumes from the checkpoint and ends with bit-identical weights and
  the same per-step losses as the uninterrupted job.

The same script, unchanged, is what a 405B user submits: only environment variables and sbatch
command-line options (which override its #SBATCH lines) differ. Skips with the reason when Slurm
or MUNGE is not installed (.ci/install_slurm.sh installs them in CI) or the tests are not root.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.multiproc import free_port
from tests.slurm_cluster import SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
JOB_TIMEOUT = 600

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))

    def on_sigterm(signum, frame):   # a CI timeout's SIGTERM still stops the daemons (teardown runs)
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        signal.signal(signal.SIGTERM, previous)
    assert not c.stragglers(), "processes of the test cluster outlived it"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny chat task with a small training split (preprocessing takes a few seconds)."""
    out = tmp_path_factory.mktemp("tiny_chat")
    subprocess.run([sys.executable, "examples/tiny_chat/make_data.py", "--out", str(out), "--train", "200",
                    "--eval", "0"], check=True, capture_output=True, cwd=REPO)
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(out / "train.jsonl"),
                    "--output", str(out / "train"), "--tokenizer", str(out / "tokenizer.model"),
                    "--template", "llama3", "--seq-len", "256", "--workers", "1", "--no-progress"],
                   check=True, capture_output=True, cwd=REPO)
    return out


def submit(cluster: SlurmCluster, data: Path, run_dir: Path) -> int:
    """sbatch launch/sft_405b.sh as a user would for the tiny config on one CPU node."""
    overrides = [f"data.train_path={data / 'train'}", "data.eval_path=null", f"data.tokenizer={data / 'tokenizer.model'}",
                 # 8 rows of 256 tokens per step (the example uses 16): quick on 2 cores
                 "data.global_batch_tokens=2048", f"train.steps={STEPS}", "train.log_interval=1",
                 "train.eval_interval=0", "checkpoint.export_hf=true"]
    env = {"CONFIG": "examples/configs/tiny_chat.yaml", "GPUS_PER_NODE": "0", "RUN_DIR": str(run_dir),
           "RDZV_PORT": str(free_port()), "OVERRIDES": " ".join(overrides), "OMP_NUM_THREADS": "1"}
    # Command-line options override the script's 405B #SBATCH lines: one node, no GPUs, and a time
    # limit longer than the script's 15-minute USR1 lead (else Slurm would signal at once).
    return cluster.sbatch(["--nodes=1", "--gpus-per-node=0", "--time=60", f"--output={run_dir}.slurm-%j.out",
                           "launch/sft_405b.sh"], env=env, cwd=REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]   # skip a line being written


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r and r.get("kind", "train") == "train"}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run_dir / "hf").glob("*.safetensors"))
    assert files, f"no Hugging Face export in {run_dir / 'hf'}"
    return {k: v for f in files for k, v in load_file(f).items()}


def job_log(run_dir: Path, job_id: int) -> str:
    return Path(f"{run_dir}.slurm-{job_id}.out").read_text()


def node_log(run_dir: Path, job_id: int, attempt: int) -> str:
    logs = sorted((run_dir / "logs").glob(f"{job_id}.{attempt}.*.log"))
    assert len(logs) == 1, f"expected one node log for attempt {attempt}, found {logs}"
    return logs[0].read_text()


@pytest.fixture(scope="module")
def reference_run(cluster, tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    job = submit(cluster, tiny_data, run_dir)
    info = cluster.wait_state(job, DONE_STATES, JOB_TIMEOUT)
    return {"job": job, "info": info, "run_dir": run_dir}


def test_sbatch_trains_tiny_config_on_cpu(reference_run):
    job, info, run_dir = reference_run["job"], reference_run["info"], reference_run["run_dir"]
    batch = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{batch}"
    assert info["Restarts"] == "0"
    assert f"job {job} attempt 0: 1 node(s) x 4 rank(s)" in batch
    assert "checkpoint.load=auto" in batch
    assert f"training step ended with status 0; latest checkpoint at step {STEPS} of {STEPS}" in batch
    assert "requeueing" not in batch and "SIGUSR1" not in batch

    log = node_log(run_dir, job, 0)
    assert re.search(r"world 4 = tp \d+ x pp \d+ x dp \d+ on cpu", log)   # srun -> torchrun -> 4 gloo ranks
    assert f"done after {STEPS} steps" in log and "resumed from" not in log

    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(loss == loss for loss in losses.values()) and losses[STEPS] < losses[1] - 1.0   # it learnt

    ckpt = run_dir / "checkpoints"
    name = (ckpt / "latest").read_text().strip()
    assert name == f"step_{STEPS:08d}" and (ckpt / name / ".metadata").exists()
    assert len(list((ckpt / name).glob("*.distcp"))) >= 1
    assert not list(ckpt.glob(".tmp-*"))
    assert set(final_weights(run_dir)) >= {"model.embed_tokens.weight", "model.norm.weight"}


def test_outside_a_job_the_script_submits_itself_sized_from_the_environment(cluster, tmp_path):
    """`NODES=... GPUS_PER_NODE=... bash launch/sft_405b.sh` from any directory: the script submits
    itself with those sizes (held here, so nothing runs) and points the job at this checkout."""
    env = {"NODES": "1", "GPUS_PER_NODE": "0", "TIME_LIMIT": "7", "CONFIG": "examples/configs/tiny_chat.yaml",
           "SBATCH_ARGS": f"--hold --parsable --output={tmp_path}/%j.out"}
    out = cluster.run(["bash", str(REPO / "launch/sft_405b.sh"), "train.steps=3"], env=env, cwd=tmp_path)
    job = int(out.stdout.strip().split(";")[0])
    try:
        info = cluster.job(job)
        assert (info["JobState"], info["Reason"]) == ("PENDING", "JobHeldUser"), info
        assert info["JobName"] == "sft-405b" and info["NumNodes"].split("-")[0] == "1"
        assert info["TimeLimit"] == "00:07:00" and info["TresPerNode"] == "gres:gpu:0"
        assert info["Requeue"] == "1" and info["Command"] == str(REPO / "launch/sft_405b.sh")
        script = cluster.run(["scontrol", "write", "batch_script", str(job), "-"]).stdout
        assert "#SBATCH --signal=B:USR1@900" in script and "#SBATCH --nodes=128" in script   # the 405B script
    finally:
        cluster.run(["scancel", str(job)], check=False)


def wait_for_step(cluster: SlurmCluster, job: int, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while max(train_losses(run_dir), default=0) < step:
        info = cluster.job(job)
        # Right after a requeue the previous start may still show as COMPLETING / REQUEUED; a job
        # that ends for good moves on to a final state and fails here.
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"), \
            f"{info}\n{cluster.logs()}"
        assert time.monotonic() < deadline, f"job {job} did not reach step {step} in {JOB_TIMEOUT}s"
        time.sleep(0.2)


def test_usr1_saves_requeues_and_resumes_to_same_weights(cluster, tiny_data, reference_run, tmp_path):
    """One job stopped twice, once per way USR1 reaches it:
    1. `scancel --batch --signal=USR1`: what `#SBATCH --signal=B:USR1@900` does 15 minutes before
       the time limit; the batch shell's trap forwards it to the ranks through srun.
    2. `scancel --signal=USR1`: straight to the job step's processes; the batch shell sees the ranks
       exit cleanly short of train.steps.
    Each time the ranks stop at a step boundary and save, the job requeues itself (same id), and
    the next start resumes; the end result equals the uninterrupted run bit for bit."""
    run_dir = tmp_path / "interrupted"
    job = submit(cluster, tiny_data, run_dir)
    stops = []
    for attempt, scancel in enumerate([["--batch", "--signal=USR1"], ["--signal=USR1"]]):
        wait_for_step(cluster, job, run_dir, (stops[-1] if stops else 0) + 2)   # mid-run, with progress
        cluster.run(["scancel", *scancel, str(job)])
        deadline = time.monotonic() + JOB_TIMEOUT
        while int(cluster.job(job)["Restarts"]) <= attempt:
            assert time.monotonic() < deadline, f"job {job} was not requeued\n{job_log(run_dir, job)}"
            time.sleep(0.2)
        log = node_log(run_dir, job, attempt)
        stops.append(max(int(m) for m in re.findall(rf"step\s+(\d+)/{STEPS}\b", log)))
    info = cluster.wait_state(job, DONE_STATES, JOB_TIMEOUT)
    batch = job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{batch}"
    assert info["Restarts"] == "2", batch
    assert 2 <= stops[0] < stops[1] < STEPS, f"stopped at steps {stops} of {STEPS}"

    # Attempt 0 stopped through the batch shell's trap, attempt 1 through the step; both requeued.
    attempts = batch.split(f"sft: job {job} attempt ")[1:]
    assert [a.split(":")[0] for a in attempts] == ["0", "1", "2"], batch
    assert "got SIGUSR1" in attempts[0] and "requeueing job" in attempts[0]
    assert "stopped early on a signal sent to the job step" in attempts[1] and "requeueing job" in attempts[1]
    assert "requeueing" not in attempts[2]
    for attempt, step in enumerate(stops):
        assert f"latest checkpoint at step {step} of {STEPS}" in attempts[attempt]
        # The next start resumed from exactly that checkpoint and went on from there.
        resumed = node_log(run_dir, job, attempt + 1)
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'} at step {step}" in resumed
        assert re.search(rf"step\s+{step + 1}/{STEPS}\b", resumed)
    assert f"done after {STEPS} steps" in node_log(run_dir, job, 2)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    # Same trajectory as the uninterrupted job: identical per-step losses and final weights.
    assert train_losses(run_dir) == train_losses(reference_run["run_dir"])
    ours, ref = final_weights(run_dir), final_weights(reference_run["run_dir"])
    assert ours.keys() == ref.keys()
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
