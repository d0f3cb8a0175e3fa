"""SLURM, against a real scheduler on this machine (scripts/slurm_local.sh: munged, slurmctld, two slurmd
"nodes"): the pretraining sbatch script runs the demo on 2 gloo processes to completion; a job warned of its
time limit checkpoints, requeues itself and continues across 2 nodes; a cancelled job, a job whose every
process gets SIGTERM (`scancel --signal=TERM --full`) and a job at its time limit leave a loadable checkpoint
of the step they stopped at, data workers on."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mae.weights.build import load_run_model

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm_local.sh"
PRETRAIN = ROOT / "slurm" / "pretrain.sbatch"
JOB_TIMEOUT = 600  # seconds; the jobs take well under a minute of compute, the machine may be shared

# The demo recipe (Fashion-MNIST, small ViT) on small batches: fractions of a second per step.
DEMO = [
    "recipe=demo",
    "train.batch_size=16",
    "data.num_workers=0",
    "log.viz_images=0",
    "log.knn_every_steps=0",
    "log.progress=false",
    "log.every_steps=1",
]
WORKERS = "data.num_workers=2"  # in the signalled job too: they ignore the signal, the trainer stops them


@pytest.fixture(scope="session")
def slurm_env():
    """Environment for sbatch/squeue/scancel on the local cluster; starts it unless it already runs, and
    stops at the end only what this fixture started."""
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    start = subprocess.run([CLUSTER, "start", "--nodes", "2"], capture_output=True, text=True)
    if start.returncode != 0:
        pytest.fail(
            f"local SLURM cluster did not start (deselect with -m 'not slurm'): {start.stderr.strip()}"
        )
    conf = re.search(
        r"SLURM_CONF=(\S+)", subprocess.run([CLUSTER, "env"], capture_output=True, text=True).stdout
    )
    env = dict(os.environ, SLURM_CONF=conf.group(1))
    # Jobs inherit this environment: `accelerate` and python of this venv, no wandb, no hub.
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    yield env
    if not was_up:
        subprocess.run([CLUSTER, "stop"], check=False)


def slurm(env: dict, *cmd: str) -> str:
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def submit(
    env: dict, workdir: Path, name: str, *args: str, nodes: int = 1, per_node: int = 2, sbatch: tuple = ()
) -> int:
    """sbatch slurm/pretrain.sbatch on CPU nodes (no GPUs), `per_node` gloo processes on each."""
    out = slurm(
        dict(env, MAE_PROCS_PER_NODE=str(per_node)),
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        "--cpus-per-task=2",
        f"--chdir={workdir}",
        f"--output={workdir}/%x-%j.out",
        *sbatch,
        str(PRETRAIN),
        *args,
    )
    return int(out.strip().split(";")[0])


def job(env: dict, jid: int) -> dict:
    text = slurm(env, "scontrol", "show", "job", "-o", str(jid))
    return dict(re.findall(r"(JobState|Restarts|ExitCode|Reason)=(\S+)", text))


def wait_for(what: str, predicate, timeout: float = JOB_TIMEOUT, every: float = 0.25):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_done(env: dict, jid: int) -> dict:
    """The final state, once every process of the job has exited (squeue lists completing jobs)."""

    def ended():
        info = job(env, jid)
        final = info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        return final and not slurm(env, "squeue", "-h", "-j", str(jid)).strip() and info

    return wait_for(f"job {jid} to end", ended)


def metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def wait_for_step(env: dict, jid: int, run: Path, step: int) -> None:
    def reached():
        state = job(env, jid)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {jid} is {state} before step {step}"
        return max(metric_steps(run), default=0) >= step

    wait_for(f"step {step} of job {jid}", reached)


def checkpoint_step(run: Path) -> int:
    return json.loads((run / "checkpoint-last" / "meta.json").read_text())["step"]


def test_sbatch_outside_slurm_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", PRETRAIN, "recipe=demo"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not inside a SLURM allocation" in r.stderr


@pytest.mark.slurm
def test_local_cluster_start_is_idempotent(slurm_env):
    pids = {p.name: p.read_text() for p in (Path(slurm_env["SLURM_CONF"]).parent / "pids").glob("*.pid")}
    subprocess.run([CLUSTER, "start", "--nodes", "2"], check=True, capture_output=True)
    again = {p.name: p.read_text() for p in (Path(slurm_env["SLURM_CONF"]).parent / "pids").glob("*.pid")}
    assert again == pids and {"munged.pid", "slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid"} <= set(pids)
    states = slurm(slurm_env, "sinfo", "-h", "-N", "-o", "%N %T").split()
    assert states[0::2] == ["n1", "n2"] and set(states[1::2]) <= {"idle", "mixed", "allocated"}


@pytest.mark.slurm
@pytest.mark.slow
def test_pretrain_job_completes_on_two_processes(slurm_env, tmp_path):
    t0 = time.monotonic()
    jid = submit(slurm_env, tmp_path, "demo-2proc", *DEMO, "train.max_steps=10", "checkpoint.every_steps=5")
    info = wait_done(slurm_env, jid)
    print(f"\n[slurm] demo job: submission to completion {time.monotonic() - t0:.1f}s")
    log = (tmp_path / f"demo-2proc-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    run = tmp_path / "runs" / "demo-2proc"  # output_dir from the job name
    assert (run / "checkpoint-last").resolve().name == "checkpoint-00000010"
    assert checkpoint_step(run) == 10
    assert metric_steps(run) == list(range(1, 11))
    assert "world_size: 2" in (run / "config.yaml").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_warned_job_requeues_and_continues_across_two_nodes(slurm_env, tmp_path):
    run, total = tmp_path / "run", 24
    args = [f"output_dir={run}", f"train.max_steps={total}", "checkpoint.every_steps=10", WORKERS]
    jid = submit(slurm_env, tmp_path, "demo-requeue", *DEMO, *args, nodes=2, per_node=1)
    wait_for_step(slurm_env, jid, run, 4)
    t_signal = time.monotonic()
    # what --signal=USR1@300 sends before the limit, here to every process of the job (batch shell included)
    slurm(slurm_env, "scancel", "--signal=USR1", "--full", str(jid))

    def running_again():
        info = job(slurm_env, jid)
        return info["Restarts"] == "1" and info["JobState"] == "RUNNING"

    wait_for("the requeued job to run", running_again)
    requeue_s = time.monotonic() - t_signal
    stopped = checkpoint_step(run)
    info = wait_done(slurm_env, jid)
    log = (tmp_path / f"demo-requeue-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["Restarts"] == "1"
    # Both runs wrote to the same log (--open-mode=append), the second on 2 nodes again.
    assert "restart 0: 2 node(s) x 1 process(es)" in log and "restart 1: 2 node(s) x 1 process(es)" in log
    first, second = log.split("restart 1: 2 node(s)")
    before = [int(s) for s in re.findall(rf"^step (\d+)/{total} ", first, re.M)]
    after = [int(s) for s in re.findall(rf"^step (\d+)/{total} ", second, re.M)]
    print(
        f"\n[slurm] requeue: signal to running again {requeue_s:.1f}s; last step before {before[-1]}, "
        f"checkpoint at {stopped}, first step after {after[0]}"
    )
    # The warned run checkpointed the step it stopped at; the requeued run went on from exactly there.
    assert 4 <= stopped == before[-1] < total
    assert before == list(range(1, stopped + 1)) and after == list(range(stopped + 1, total + 1))
    assert metric_steps(run) == list(range(1, total + 1))
    assert checkpoint_step(run) == total


@pytest.mark.slurm
@pytest.mark.slow
def test_cancelled_job_leaves_loadable_checkpoint(slurm_env, tmp_path):
    run = tmp_path / "run"
    # No periodic checkpoint before step 100: the one on disk is written on SIGTERM.
    jid = submit(
        slurm_env,
        tmp_path,
        "demo-cancel",
        *DEMO,
        f"output_dir={run}",
        "train.max_steps=40",
        "checkpoint.every_steps=100",
    )
    wait_for_step(slurm_env, jid, run, 3)
    seen = max(metric_steps(run))
    slurm(slurm_env, "scancel", str(jid))
    info = wait_done(slurm_env, jid)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"
    step = checkpoint_step(run)
    assert seen <= step < 40
    assert not list(run.glob("checkpoint-*.tmp"))
    model, cfg = load_run_model(run)
    assert cfg.model.name == "mae_vit_tiny_patch16"
    loss, _, _ = model(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(loss)


def assert_stopped_at_last_step(run: Path, log: str) -> int:
    """The run checkpointed the last step it logged (each step logged once) and said so; returns it."""
    step = checkpoint_step(run)
    assert metric_steps(run) == list(range(1, step + 1)), log[-3000:]
    assert f"SIGTERM received: checkpointed step {step}, exiting" in log
    assert not list(run.glob("checkpoint-*.tmp"))
    return step


@pytest.mark.slurm
@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job_checkpoints_and_resubmission_resumes(slurm_env, tmp_path):
    """`scancel --signal=TERM --full`: the batch shell, srun, the launcher, the training processes and their
    data workers all get SIGTERM. The job still ends cleanly with the checkpoint of the step it stopped at,
    and the same job submitted again continues from it to the end, each step logged once."""
    run, total = tmp_path / "run", 40
    args = [*DEMO, WORKERS, f"output_dir={run}", f"train.max_steps={total}", "checkpoint.every_steps=100"]
    jid = submit(slurm_env, tmp_path, "demo-term", *args)
    wait_for_step(slurm_env, jid, run, 4)
    slurm(slurm_env, "scancel", "--signal=TERM", "--full", str(jid))
    info = wait_done(slurm_env, jid)
    log = (tmp_path / f"demo-term-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    step = assert_stopped_at_last_step(run, log)
    assert 4 <= step < total and "DataLoader worker" not in log
    print(
        f"\n[slurm] scancel --signal=TERM --full: {info['JobState']} {info['ExitCode']}, checkpoint at {step}"
    )

    again = submit(slurm_env, tmp_path, "demo-term", *args)
    info = wait_done(slurm_env, again)
    log = (tmp_path / f"demo-term-{again}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"at step {step}" in log and checkpoint_step(run) == total
    assert metric_steps(run) == list(range(1, total + 1))


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_checkpoints_the_last_step(slurm_env, tmp_path):
    """A job that reaches its time limit with no warning signal (here overridden by SIGURG, which everything
    ignores): SLURM sends SIGTERM to every process, then SIGKILL after KillWait. The checkpoint of the step it
    stopped at is written in between, complete and loadable."""
    run = tmp_path / "run"
    args = [*DEMO, WORKERS, f"output_dir={run}", "train.max_steps=100000", "checkpoint.every_steps=100000"]
    jid = submit(slurm_env, tmp_path, "demo-limit", *args, sbatch=("--time=1", "--signal=URG@1"))
    info = wait_done(slurm_env, jid)
    log = (tmp_path / f"demo-limit-{jid}.out").read_text()
    assert info["JobState"] == "TIMEOUT", log[-3000:]
    step = assert_stopped_at_last_step(run, log)
    print(f"\n[slurm] time limit: {info['JobState']} {info['ExitCode']}, checkpoint at {step}")
    model, _ = load_run_model(run)
    loss, _, _ = model(torch.rand(2, 1, 28, 28))
    assert torch.isfinite(loss)
