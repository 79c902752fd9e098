"""Cluster launchers through submitit (xbm/cluster.py, scripts/sweep.py --launcher, scripts/submit.py):
the sbatch script, bad input that submits nothing, torchrun's variables per task, and real
submitit-local jobs that are preempted, requeued and resume to the local launcher's results."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from scripts_loader import load_script
from xbm import cluster
from xbm.checkpoint.io import load_checkpoint

pytest.importorskip("submitit")

sweep = load_script("sweep")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = "configs/glyphs_xbn.yaml"


def _tiny(root, *extra):
    return ["DATA.ROOT", str(root), "DATA.GLYPHS.MIN_FONTS", "4", "MODEL.DEVICE", "cpu",
            "MODEL.BACKBONE.CONVNET_WIDTHS", "(8, 16, 16, 32)", "MODEL.HEAD.DIM", "32", "DATA.BATCH_SIZE", "8",
            "XBM.START_ITERATION", "5", "TEST.EVAL_PERIOD", "0", *extra]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fake_slurm(bin_dir, sbatch_body):
    """sbatch (the given shell body) and srun stand-ins on a PATH of their own; sbatch logs each call."""
    bin_dir.mkdir(exist_ok=True)
    calls = bin_dir / "sbatch.calls"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n{sbatch_body}\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return calls


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("text, minutes", [
    ("90", 90), ("4:00:00", 240), ("1-00:00:00", 1440), ("2-12", 3600), ("1-01:30", 1530), ("0:30", 1), ("10:30", 11),
])
def test_slurm_time_formats_in_minutes(text, minutes):
    assert cluster.parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "4h", "1:2:3:4", "0", "-5"])
def test_bad_time_limits_are_one_sentence(bad):
    with pytest.raises(cluster.ClusterError, match="--time"):
        cluster.parse_time(bad)


def test_extra_sbatch_flags():
    assert cluster.parse_sbatch_flag("mail-type=END") == ("mail-type", "END")
    assert cluster.parse_sbatch_flag("--exclusive") == ("exclusive", True)
    assert cluster.parse_sbatch_flag("--mem=64G") == ("mem", "64G")
    for bad in ("=5", "mem=", "two words"):
        with pytest.raises(cluster.ClusterError, match="--sbatch"):
            cluster.parse_sbatch_flag(bad)
    with pytest.raises(cluster.ClusterError, match="submitit's signal drives the save and requeue"):
        cluster.parse_sbatch_flag("--signal=TERM@60")


def test_each_task_gets_torchruns_variables():
    job = SimpleNamespace(num_tasks=8, num_nodes=2, global_rank=5, local_rank=1, node=1,
                          hostnames=["gpu-a7", "gpu-b2"], raw_job_id="123456")
    assert cluster.distributed_environment(job) == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
        "MASTER_ADDR": "gpu-a7", "MASTER_PORT": str(29500 + 123456 % 10000)}
    one_node = SimpleNamespace(num_tasks=2, num_nodes=1, global_rank=0, local_rank=0, node=0,
                               hostnames=["gpu-a7"], raw_job_id="77")
    assert cluster.distributed_environment(one_node)["MASTER_ADDR"] == "127.0.0.1"
    single = SimpleNamespace(num_tasks=1, num_nodes=1, global_rank=0, local_rank=0, node=0, hostnames=["h"],
                             raw_job_id="1")
    assert cluster.distributed_environment(single) == {}  # a plain single-process run, as without torchrun


# ------------------------------------------------------------------------------ SLURM, with stand-ins
def test_a_sweep_is_one_job_array_with_the_clusters_options(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    calls = _fake_slurm(bin_dir, f'cp "$1" {bin_dir}/script.sh\necho "Submitted batch job 4242"')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = sweep.build_parser().parse_args([
        "--grid", "XBM.SIZE=64,128", "--launcher", "slurm", "--partition", "gpu", "--gpus-per-node", "4",
        "--nodes", "2", "--time", "1-00:00:00", "--cpus-per-gpu", "10", "--account", "lab", "--qos", "high",
        "--constraint", "a100", "--sbatch", "mail-type=END", "--sbatch", "exclusive", "--array-parallelism", "1"])
    options = cluster.options_from_args(args)
    plan = sweep.plan_sweep(CFG, [("XBM.SIZE", ["64", "128"])], 2, ["SOLVER.MAX_ITERS", "10"], str(tmp_path / "s"))
    executor = cluster.make_executor(options, str(tmp_path / "s" / "submitit"))
    jobs = cluster.submit(executor, sweep.training_jobs(list(plan.runs.values()), CFG))
    assert [job.job_id for job in jobs] == ["4242_0", "4242_1", "4242_2", "4242_3"]
    assert len(calls.read_text().splitlines()) == 1  # one sbatch call for the four runs
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", (bin_dir / "script.sh").read_text(), re.M))
    assert {k: flags[k] for k in ("partition", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task",
                                  "time", "account", "qos", "constraint", "mail-type", "exclusive", "array",
                                  "signal", "job-name")} == {
        "partition": "gpu", "nodes": "2", "ntasks-per-node": "4", "gpus-per-node": "4", "cpus-per-task": "10",
        "time": "1440", "account": "lab", "qos": "high", "constraint": "a100", "mail-type": "END", "exclusive": "",
        "array": "0-3%1", "signal": "USR2@120", "job-name": "xbm"}
    # Each array task runs the run's own command, the one the local launcher runs.
    first = jobs[0].submission()
    assert first.function.command == sweep.command_of(next(iter(plan.runs.values())), CFG)


def _sweep_argv(out, *extra):
    return ["--cfg", CFG, "--grid", "XBM.SIZE=64,128", "--grid", "XBM.ADAPT.NAME=none,xbn", "--output", str(out),
            "--launcher", "slurm", "--partition", "gpu", *extra, "SOLVER.MAX_ITERS", "10"]


def test_slurm_without_sbatch_says_so_and_submits_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(_sweep_argv(tmp_path / "s"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: --launcher slurm needs SLURM's sbatch and srun on the PATH and there is none here: "
                   "run this on the cluster's login node, or use --launcher local\n")
    assert not (tmp_path / "s").exists()


def test_an_unknown_partition_passes_sbatchs_message_in_one_line(tmp_path, monkeypatch, capsys):
    calls = _fake_slurm(tmp_path / "bin", "echo 'sbatch: error: invalid partition specified: gpux' >&2\n"
                        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
                        "exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(_sweep_argv(tmp_path / "s"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: sbatch refused the submission, so nothing was submitted: invalid partition specified: "
                   "gpux; Batch job submission failed: Invalid partition name specified\n")
    assert len(calls.read_text().splitlines()) == 1
    assert not (tmp_path / "s" / "results.csv").exists()


def test_more_jobs_than_max_jobs_need_yes(tmp_path, monkeypatch, capsys):
    calls = _fake_slurm(tmp_path / "bin", 'echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(_sweep_argv(tmp_path / "s", "--seeds", "2", "--max-jobs", "6"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "error: this would submit 8 jobs, more than --max-jobs 6: check the grid, then add --yes (or raise "
        "--max-jobs) to submit them\n")
    assert not calls.exists()


def test_submit_refuses_a_folder_of_another_run_before_submitting(tmp_path, monkeypatch, capsys):
    calls = _fake_slurm(tmp_path / "bin", 'echo "Submitted batch job 7"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    submit = load_script("submit")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(sweep.load_cfg(CFG, ["XBM.SIZE", "64"]).dump())
    with pytest.raises(SystemExit) as exit_info:
        submit.main(["--partition", "gpu", "--cfg", CFG, "OUTPUT_DIR", str(out), "XBM.SIZE", "128"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds a run with another config (its value -> this one's): ")
    assert "XBM.SIZE: 64 -> 128" in err and err.count("\n") == 1
    assert not calls.exists()


# ------------------------------------------------------------------------------ real jobs: submitit-local
def _wait_for(path, seconds=240):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _preempt(folder):
    """What SLURM does at preemption (with preempt_send_user_signal) or before the time limit:
    submitit's signal to every process of the job: the training (it ignores it) and submitit's task."""
    training = json.loads(open(os.path.join(folder, "run.lock")).read())["pid"]
    with open(f"/proc/{training}/stat") as f:
        task = int(f.read().rsplit(")", 1)[1].split()[1])
    for pid in (training, task):
        os.kill(pid, signal.SIGUSR2)
    return training


@pytest.mark.slow
@pytest.mark.heavy
def test_submitit_local_sweep_preempted_and_requeued_equals_the_local_launcher(tmp_path, glyph_root, monkeypatch,
                                                                               capsys):
    # The same thread count in both sweeps, so the sums (and metrics) are the same bit for bit.
    monkeypatch.setenv("OMP_NUM_THREADS", sweep.child_environment(2)["OMP_NUM_THREADS"])
    grid = ["--cfg", CFG, "--grid", "XBM.SIZE=32,48", "--grid", "XBM.ADAPT.NAME=none,xbn", "--seeds", "2"]
    opts = _tiny(glyph_root, "SOLVER.MAX_ITERS", "20", "SOLVER.CHECKPOINT_PERIOD", "5")
    assert sweep.main([*grid, "--jobs", "2", "--output", str(tmp_path / "local"), *opts]) == 0

    out = tmp_path / "cluster"
    command = [sys.executable, "scripts/sweep.py", *grid, "--launcher", "submitit-local", "--time", "30",
               "--output", str(out), *opts]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    preempted = out / "XBM.SIZE=32__XBM.ADAPT.NAME=none__seed=0"
    _wait_for(preempted / "checkpoints" / "last.pth")
    _preempt(preempted)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "submitted jobs" in output and output.count(": ran (") == 8

    log = (preempted / "console.log").read_text()
    stopped_at = int(re.search(r"stopped at iteration (\d+)", log).group(1))
    assert 5 <= stopped_at < 20
    assert f"resumed from {preempted}/checkpoints/last.pth at iteration {stopped_at}" in log
    assert log.count("$ ") == 2  # started, requeued
    assert log.count("--resume auto") == 2
    local, remote = _read_csv(tmp_path / "local" / "results.csv"), _read_csv(out / "results.csv")
    assert len(remote) == 8 and [r["status"] for r in remote] == ["ran"] * 8
    metrics = [k for k in local[0] if k.startswith("test/")]
    assert "test/R@1" in metrics
    for a, b in zip(local, remote):
        assert (a["XBM.SIZE"], a["XBM.ADAPT.NAME"], a["seed"]) == (b["XBM.SIZE"], b["XBM.ADAPT.NAME"], b["seed"])
        assert {m: float(b[m]) for m in metrics} == pytest.approx({m: float(a[m]) for m in metrics}, abs=1e-6)
    assert (out / "summary.md").exists() and (out / "recall_vs_size.png").exists()

    capsys.readouterr()
    assert sweep.main(command[2:]) == 0  # again, in this process: nothing is submitted
    assert "8 already finished, 0 to train, nothing to submit" in capsys.readouterr().out
    assert [r["status"] for r in _read_csv(out / "results.csv")] == ["skipped"] * 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_per_run_are_torchruns_ddp_and_resume_after_preemption(tmp_path, glyph_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    opts = _tiny(glyph_root, "XBM.SIZE", "40", "SOLVER.MAX_ITERS", "20", "SOLVER.CHECKPOINT_PERIOD", "5",
                 "TEST.EVAL_PERIOD", "20")
    reference = tmp_path / "torchrun"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "tools/train_net.py",
                    "--cfg", CFG, *opts, "OUTPUT_DIR", str(reference)], env=env, check=True, capture_output=True)

    out = tmp_path / "submitted"
    proc = subprocess.Popen([sys.executable, "scripts/submit.py", "--launcher", "submitit-local", "--gpus-per-node",
                             "2", "--time", "30", "--wait", "--cfg", CFG, *opts, "OUTPUT_DIR", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(out / "checkpoints" / "last.pth")
    _preempt(out)  # rank 0's task; rank 1 stops at the same step through the training's own agreement
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert re.search(r"finished in \d+ s: test R@1 ", output)
    log = (out / "log.txt").read_text()
    assert log.count("distributed: 2 processes, DATA.BATCH_SIZE 8 per process, global batch 16") == 2
    stopped_at = int(re.search(r"stopped at iteration (\d+)", log).group(1))
    assert 5 <= stopped_at < 20 and f"at iteration {stopped_at}" in log.split("resumed from", 1)[1]
    assert (out / "console.rank1.log").read_text().count("$ ") == 2

    a = load_checkpoint(str(reference / "checkpoints" / "last.pth"))
    b = load_checkpoint(str(out / "checkpoints" / "last.pth"))
    assert a["iteration"] == b["iteration"] == 20 and b["world_size"] == 2
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    ra, rb = (json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (reference, out))
    for key in ("R@1", "R@10", "MAP@R"):
        assert rb[key] == pytest.approx(ra[key], abs=1e-6)


def test_no_second_submission_while_the_last_ones_jobs_are_queued(tmp_path, monkeypatch, capsys):
    calls = _fake_slurm(tmp_path / "bin", 'echo "Submitted batch job 4242"')
    squeue = tmp_path / "bin" / "squeue"  # lists array 4242's tasks while any is queued or running
    squeue.write_text(f'#!/bin/sh\n[ -f {tmp_path}/ended ] && exit 0\n[ "$5" = 4242 ] && echo "4242_[1-3]" && '
                      'echo 4242_0\nexit 0\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "s" / "submitit"
    cluster.record_jobs(str(folder), "slurm", {f"run{i}": f"4242_{i}" for i in range(4)})
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(_sweep_argv(tmp_path / "s"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: job(s) 4242 of the last submission from here ({folder}/jobs.json) are still queued or running: "
        "wait for them to end and run this again to collect the results, or cancel them (scancel 4242) first\n")
    assert not calls.exists()
    (tmp_path / "ended").touch()
    assert cluster.active_jobs(str(folder)) == []
    cluster.record_jobs(str(folder), "submitit-local", {"run0": str(os.getpid())})  # not a submitit controller
    assert cluster.active_jobs(str(folder)) == []
