"""benchmark/: the runner (dry run, skipping finished runs, failures, placeholders, slurm job files),
the report (its numbers against numpy on synthetic TensorBoard files, the PNG), the QDagger
reincarnation benchmark (its seeds, skipping finished runs, its report) and the shell scripts."""

import glob
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, error_line, import_benchmark_tool
from torch.utils.tensorboard import SummaryWriter

RUN = os.path.join(ROOT, "benchmark", "run.py")
REPORT = os.path.join(ROOT, "benchmark", "report.py")

# Stands in for a training script: makes runs/<env>__<exp>__<seed>__<time>/ with a TensorBoard file
# named as the real ones name theirs, prints what it got, fails for the env named in $FAKE_FAIL_ENV,
# and with $FAKE_INTERRUPT stops as an interrupted run does: a checkpoint, then exit 130.
FAKE_SCRIPT = """\
import argparse, os, signal, socket, sys, time
parser = argparse.ArgumentParser()
for flag in ("--env-id", "--seed", "--exp-name", "--teacher", "--tag", "--resume"):
    parser.add_argument(flag)
parser.add_argument("--num-seeds", type=int, default=1)
args = parser.parse_args()
print("argv", sys.argv[1:], "OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
if args.resume:
    sys.exit(0 if os.path.isdir(args.resume) else f"no run {args.resume}")
if args.env_id == os.environ.get("FAKE_FAIL_ENV"):
    sys.exit("fake failure")
stamp = int(time.time())
for seed in range(int(args.seed), int(args.seed) + args.num_seeds):  # one run directory per agent, as pqn.py --num-seeds
    run_dir = f"runs/{args.env_id.replace('/', '-')}__{args.exp_name}__{seed}__{stamp}"
    os.makedirs(run_dir)
    open(f"{run_dir}/events.out.tfevents.{stamp}.{socket.gethostname()}.{os.getpid()}.0", "w").close()
if os.environ.get("FAKE_INTERRUPT"):
    open(f"{run_dir}/checkpoint.pt", "w").close()
    sys.exit(130)
if os.environ.get("FAKE_HANG"):  # "checkpoint": writes one first, as a long run does periodically
    if os.environ["FAKE_HANG"] == "checkpoint":
        open(f"{run_dir}/checkpoint.pt", "w").close()
    time.sleep(60)
if os.environ.get("FAKE_WAIT_FOR_SIGTERM"):  # as the real scripts: a checkpoint, then exit 128 + 15
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print("waiting", flush=True)
    time.sleep(60)
"""


def call(tool, *flags, cwd=ROOT, env=None, timeout=60):
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FAKE_FAIL_ENV")}
    return subprocess.run(
        [sys.executable, tool, *flags],
        cwd=cwd,
        env=dict(environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def root(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE_SCRIPT)
    return tmp_path


def runner(root, *flags, extra=(), env=None, benchmark="b", exp="e", envs=("A", "MinAtar/B"), seeds=("1", "2")):
    return call(
        RUN, "--benchmark", benchmark, "--exp-name", exp, "--script", "fake.py", "--env-ids", *envs, "--seeds", *seeds,
        "--root", str(root), *flags, "--", *extra, env=env,
    )  # fmt: skip


def logs(root, benchmark="b"):
    return root / "benchmark" / "logs" / benchmark


def test_dry_run_prints_the_commands_and_runs_nothing(root):
    result = runner(root, "--dry-run", extra=["--tag", "{env_id}-{seed}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "python fake.py --env-id A --seed 1 --exp-name e --tag A-1",
        "python fake.py --env-id A --seed 2 --exp-name e --tag A-2",
        "python fake.py --env-id MinAtar/B --seed 1 --exp-name e --tag MinAtar/B-1",
        "python fake.py --env-id MinAtar/B --seed 2 --exp-name e --tag MinAtar/B-2",
        "# 4 commands: 4 to run, 0 already done",
    ]
    assert sorted(os.listdir(root)) == ["fake.py"]


def test_failures_do_not_stop_the_others_and_finished_runs_are_skipped(root):
    result = runner(root, "--workers", "2", env={"FAKE_FAIL_ENV": "A"})
    assert result.returncode == 1
    # The two runs of A failed and are listed with their logs; those of MinAtar/B finished.
    summary = result.stdout[result.stdout.index("b/e: 4 commands") :]
    assert "2 finished, 0 skipped (already done), 2 failed" in summary
    for seed in (1, 2):
        assert f"FAILED: python fake.py --env-id A --seed {seed} --exp-name e" in summary
        log = logs(root) / f"e__A__{seed}.log"
        assert str(log) in summary and "fake failure" in log.read_text()
        assert not (logs(root) / f"e__A__{seed}.done").exists()
        # A finished run: its .done marker names the run directory it made; OMP_NUM_THREADS=1 by default.
        run_dir = (logs(root) / f"e__MinAtar-B__{seed}.done").read_text().strip()
        assert re.fullmatch(rf"runs/MinAtar-B__e__{seed}__\d+", run_dir) and (root / run_dir).is_dir()
        assert "OMP_NUM_THREADS 1" in (logs(root) / f"e__MinAtar-B__{seed}.log").read_text()

    # Run again: the finished runs are skipped, the failed ones run (and now finish).
    result = runner(root, "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("# skipped, already done") == 2
    assert "b/e: 4 commands, 2 finished, 2 skipped (already done), 0 failed" in result.stdout
    assert len(glob.glob(str(root / "runs" / "MinAtar-B__e__1__*"))) == 1
    assert len(glob.glob(str(root / "runs" / "A__e__1__*"))) == 1
    assert runner(root, "--dry-run").stdout.splitlines()[-1] == "# 4 commands: 0 to run, 4 already done"

    # The same runs with other flags are not taken as done: one error line.
    result = runner(root, extra=["--tag", "x"])
    assert error_line(result).startswith("error: 4 of these runs already finished in benchmark 'b' with another command")
    assert result.returncode == 2


def test_several_agents_in_one_process_get_a_marker_each(root):
    result = runner(root, "--num-seeds", "3", envs=("A",), seeds=("1", "4"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "python fake.py --env-id A --seed 4 --exp-name e --num-seeds 3" in result.stdout
    assert "b/e: 2 commands, 2 finished" in result.stdout
    for first in (1, 4):
        stamps = set()
        for seed in range(first, first + 3):
            run_dir = (logs(root) / f"e__A__{seed}.done").read_text().strip()
            assert re.fullmatch(rf"runs/A__e__{seed}__\d+", run_dir) and (root / run_dir).is_dir()
            stamps.add(run_dir.rsplit("__", 1)[1])
            # Every agent's log names the command that trained it, for the report.
            assert (
                (logs(root) / f"e__A__{seed}.log")
                .read_text()
                .startswith(f"# command: python fake.py --env-id A --seed {first} ")
            )
        assert len(stamps) == 1
    # Run again: all done. With a marker missing, its command runs again.
    assert (
        runner(root, "--num-seeds", "3", "--dry-run", envs=("A",), seeds=("1", "4")).stdout.splitlines()[-1]
        == "# 2 commands: 0 to run, 2 already done"
    )
    os.remove(logs(root) / "e__A__5.done")
    assert runner(root, "--num-seeds", "3", "--dry-run", envs=("A",), seeds=("1", "4")).stdout.splitlines()[-2:] == [
        "python fake.py --env-id A --seed 4 --exp-name e --num-seeds 3",
        "# 2 commands: 1 to run, 1 already done",
    ]
    # Agents of two commands may not share a seed.
    line = error_line(runner(root, "--num-seeds", "3", envs=("A",), seeds=("1", "3")))
    assert "the agents of two commands would share seeds" in line


def test_run_dir_placeholder_gives_the_run_directory_of_another_exp(root):
    # The student needs the teacher of its env and seed; the teacher of A failed.
    teacher = runner(root, exp="teacher", env={"FAKE_FAIL_ENV": "A"})
    assert teacher.returncode == 1
    student = runner(root, exp="student", extra=["--teacher", "{run_dir:teacher}/teacher.pt"])
    assert student.returncode == 1
    assert "needs the run of --exp-name teacher for A seed 1, which has not finished" in student.stdout
    for seed in (1, 2):
        teacher_dir = (logs(root) / f"teacher__MinAtar-B__{seed}.done").read_text().strip()
        log = (logs(root) / f"student__MinAtar-B__{seed}.log").read_text()
        assert f"'--teacher', '{teacher_dir}/teacher.pt'" in log
        assert log.startswith(
            f"# command: python fake.py --env-id MinAtar/B --seed {seed} --exp-name student --teacher "
            f"'{{run_dir:teacher}}/teacher.pt'\n"
        )


def fake_sbatch(tmp_path):
    """An `sbatch` that records its arguments and answers job ids 101, 102, ... as `sbatch --parsable` does;
    and `python`, which the job files call, as this interpreter (a machine may have only `python3`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    sbatch = bin_dir / "sbatch"
    calls = tmp_path / "sbatch_calls"
    sbatch.write_text(f'#!/bin/bash\necho "$@" >> {calls}\necho "$((100 + $(wc -l < {calls})));cluster"\n')
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_slurm_writes_job_files_submits_them_and_the_jobs_work(root, tmp_path):
    env, calls = fake_sbatch(tmp_path)
    slurm_flags = ["--slurm", "--slurm-cpus", "4", "--slurm-gpus", "1", "--slurm-time", "2:00:00"]
    # --dry-run: the job files are written, the sbatch commands printed, nothing submitted.
    result = runner(root, *slurm_flags, "--dry-run", exp="teacher", envs=["A"], seeds=["1"], env=env)
    assert result.returncode == 0, result.stderr
    job_file = logs(root) / "slurm" / "teacher__A__1.sbatch"
    assert result.stdout.splitlines()[0] == f"sbatch --parsable {job_file}"
    assert job_file.exists() and not calls.exists()

    assert runner(root, *slurm_flags, exp="teacher", envs=["A"], seeds=["1"], env=env).returncode == 0
    result = runner(
        root, *slurm_flags, exp="student", envs=["A"], seeds=["1"], extra=["--teacher", "{run_dir:teacher}/t.pt"], env=env
    )
    assert result.returncode == 0, result.stderr
    student_file = logs(root) / "slurm" / "student__A__1.sbatch"
    # The student waits for its teacher's job.
    assert calls.read_text().splitlines() == [f"--parsable {job_file}", f"--parsable --dependency=afterok:101 {student_file}"]
    text = job_file.read_text()
    for line in (
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=2:00:00",
        f"#SBATCH --output={logs(root)}/teacher__A__1.log",
    ):
        assert line in text.splitlines()
    assert "    python fake.py --env-id A --seed 1 --exp-name teacher &\n" in text
    # Submitted jobs are not submitted again.
    again = runner(root, *slurm_flags, exp="teacher", envs=["A"], seeds=["1"], env=env)
    assert "# skipped, submitted before as job 101" in again.stdout and len(calls.read_text().splitlines()) == 2

    # The job files do what slurm would run: the teacher marks itself done, the student gets its directory.
    job_env = dict(os.environ, **env)
    student = subprocess.run(["bash", str(student_file)], env=job_env, capture_output=True, text=True)
    assert student.returncode == 1 and "the run of --exp-name teacher for this env and seed has not finished" in student.stdout
    for path in (job_file, student_file):
        assert subprocess.run(["bash", str(path)], env=job_env, capture_output=True, text=True).returncode == 0
    teacher_dir = (logs(root) / "teacher__A__1.done").read_text().strip()
    assert (root / teacher_dir).is_dir()
    assert (logs(root) / "student__A__1.done").exists()
    assert runner(root, "--dry-run", exp="student", envs=["A"], seeds=["1"]).stdout.startswith("# skipped, already done")


def test_a_slurm_job_stopped_by_sigterm_requeues_itself_and_resumes_its_run(root, tmp_path):
    env, calls = fake_sbatch(tmp_path)
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path / "scontrol_calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    assert runner(root, "--slurm", exp="e", envs=["A"], seeds=["1"], env=env).returncode == 0
    job_file = logs(root) / "slurm" / "e__A__1.sbatch"
    text = job_file.read_text()
    assert "#SBATCH --signal=B:TERM@300" in text and "#SBATCH --requeue" in text
    # Slurm signals the job script (B:), which passes SIGTERM on to the run.
    job_env = dict(os.environ, PATH=env["PATH"], SLURM_JOB_ID="7", FAKE_WAIT_FOR_SIGTERM="1")
    job = subprocess.Popen(["bash", str(job_file)], cwd=root, env=job_env, stdout=subprocess.PIPE, text=True)
    for line in job.stdout:
        if line.startswith("waiting"):
            break
    job.send_signal(15)
    out, _ = job.communicate(timeout=30)
    assert job.returncode == 0, out
    assert (tmp_path / "scontrol_calls").read_text().split() == ["requeue", "7"]
    run_dir = (logs(root) / "e__A__1.resume").read_text().strip()
    assert run_dir.startswith("runs/A__e__1__") and not (logs(root) / "e__A__1.done").exists()
    # The requeued job continues that run with --resume and marks it done.
    again = subprocess.run(
        ["bash", str(job_file)], cwd=root, env=dict(job_env, FAKE_WAIT_FOR_SIGTERM=""), capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"argv ['--resume', '{run_dir}']" in again.stdout
    assert (logs(root) / "e__A__1.done").read_text().strip() == run_dir and not (logs(root) / "e__A__1.resume").exists()


def test_a_run_stopped_with_a_checkpoint_is_resumed_by_the_next_attempt(root):
    first = runner(root, envs=["A"], seeds=["1"], env={"FAKE_INTERRUPT": "1"})
    assert first.returncode == 1 and "exit 130" in first.stdout
    run_dir = (logs(root) / "e__A__1.resume").read_text().strip()
    assert run_dir.startswith("runs/A__e__1__") and (root / run_dir / "checkpoint.pt").is_file()
    again = runner(root, envs=["A"], seeds=["1"])
    assert again.returncode == 0, again.stdout + again.stderr
    log = (logs(root) / "e__A__1.log").read_text()
    assert log.startswith("# command: python fake.py --env-id A --seed 1 --exp-name e\n")  # one log, both attempts
    assert f"argv ['--resume', '{run_dir}']" in log and log.count("# exit status") == 2
    assert (logs(root) / "e__A__1.done").read_text().strip() == run_dir and not (logs(root) / "e__A__1.resume").exists()
    assert os.listdir(root / "runs") == [os.path.basename(run_dir)]


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_run_killed_with_its_runner_continues_from_its_checkpoint_or_starts_again(root, checkpoint):
    env = dict(os.environ, FAKE_HANG="checkpoint" if checkpoint else "before")
    command = [sys.executable, RUN, "--benchmark", "b", "--exp-name", "e", "--script", "fake.py", "--env-ids", "A"]
    command += ["--seeds", "1", "--root", str(root)]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    marker = logs(root) / "e__A__1.resume"
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the runner and its run die at once, as when the machine goes down
    first.wait(timeout=10)
    run_dir = marker.read_text().strip()
    assert run_dir.startswith("runs/A__e__1__")
    again = runner(root, envs=["A"], seeds=["1"])
    assert again.returncode == 0, again.stdout + again.stderr
    log = (logs(root) / "e__A__1.log").read_text()
    done = (logs(root) / "e__A__1.done").read_text().strip()
    assert not marker.exists()
    if checkpoint:
        assert f"argv ['--resume', '{run_dir}']" in log and done == run_dir
    else:
        assert f"# {run_dir} has no checkpoint to continue from: starting the run again" in log
        assert "--resume" not in log and done != run_dir and done.startswith("runs/A__e__1__")


def test_a_slurm_job_takes_the_run_directory_its_own_process_wrote(root, tmp_path):
    env, _ = fake_sbatch(tmp_path)
    assert runner(root, "--slurm", exp="e", envs=["A"], seeds=["1"], env=env).returncode == 0
    # Another job (another script with the same exp name, env and seed) started a run a minute later.
    other = root / "runs" / "A__e__1__99999999999"
    other.mkdir(parents=True)
    (other / "events.out.tfevents.99999999999.host.1.0").write_text("")
    job_file = logs(root) / "slurm" / "e__A__1.sbatch"
    job = subprocess.run(["bash", str(job_file)], env=dict(os.environ, **env), capture_output=True, text=True)
    assert job.returncode == 0, job.stdout + job.stderr
    done = (logs(root) / "e__A__1.done").read_text().strip()
    assert done.startswith("runs/A__e__1__") and done != "runs/A__e__1__99999999999"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--script", "nope.py", "--env-ids", "A"], "error: --script nope.py: no such file in"),
        (["--script", "fake.py", "--env-ids"], "error: argument --env-ids: expected at least one argument"),
        (["--script", "fake.py"], "error: the following arguments are required: --env-ids"),
        (["--script", "fake.py", "--env-ids", "A", "--", "--tag", "{env}"], "error: unknown placeholder {env} in '{env}'"),
        (["--script", "fake.py", "--env-ids", "A", "--", "--seed", "3"], "error: --seed after --: give it to the runner"),
        (["--script", "fake.py", "--env-ids", "A", "--workers", "0"], "error: --workers 0: must be at least 1"),
        (["--script", "fake.py", "--env-ids", "A", "--seeds", "1", "-1"], "error: --seeds 1 -1: seeds must not be negative"),
        (["--benchmark", "..", "--script", "fake.py", "--env-ids", "A"], "error: --benchmark '..': use letters, digits"),
        (["--script", "fake.py", "--env-ids", "A", "--slurm", "--dry-run", "--slurm-cpus", "-5"], "error: --slurm-cpus -5:"),
        (["--script", "fake.py", "--env-ids", "A", "--slurm", "--dry-run", "--slurm-gpus", "-1"], "error: --slurm-gpus -1:"),
        (
            ["--script", "fake.py", "--env-ids", "A", "--slurm", "--dry-run", "--slurm-template", "{root}/binary.sbatch"],
            "error: --slurm-template {root}/binary.sbatch: not a text file (not UTF-8)",
        ),
        (
            ["--script", "fake.py", "--env-ids", "A", "--root", "{root}/blocked"],
            "error: cannot write to {root}/blocked/benchmark/logs/b: Not a directory",
        ),
        (
            ["--script", "fake.py", "--env-ids", "A", "--root", "{root}/blocked", "--slurm", "--dry-run"],
            "error: cannot write to {root}/blocked/benchmark/logs/b/slurm: Not a directory",
        ),
    ],
)
def test_runner_bad_input_is_one_error_line(root, flags, message):
    # A template that is not text, and a root whose benchmark/ is a file: benchmark/logs/ cannot be made
    # there, also by root (whom file permissions do not stop).
    (root / "binary.sbatch").write_bytes(bytes(range(256)))
    (root / "blocked").mkdir()
    (root / "blocked" / "fake.py").write_text(FAKE_SCRIPT)
    (root / "blocked" / "benchmark").write_text("")
    flags = [flag.replace("{root}", str(root)) for flag in flags]
    result = call(RUN, "--benchmark", "b", "--exp-name", "e", "--root", str(root), *flags)
    assert error_line(result).startswith(message.replace("{root}", str(root)))
    assert result.returncode == 2


def test_a_finished_run_whose_log_is_not_utf8_is_skipped(root):
    # A run's output can be any bytes; its log's first line still names its command.
    assert runner(root, envs=["A"], seeds=["1"]).returncode == 0
    log = logs(root) / "e__A__1.log"
    log.write_bytes(log.read_bytes() + b"\xff\xfe output that is not UTF-8\n")
    again = runner(root, envs=["A"], seeds=["1"])
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("# skipped, already done (runs/A__e__1__")
    # The same log with another command is still another command's run.
    log.write_bytes(b"# command: python fake.py --other\n\xff\n")
    assert error_line(runner(root, envs=["A"], seeds=["1"])).startswith("error: 1 of these runs already finished")


# Synthetic runs for the report: 2 variants × 2 envs × 3 seeds, 10,000 env steps each.
ENVS = ["CartPole-v1", "MinAtar/Breakout-v1"]
VARIANTS = ["pdqn", "pqn_minatar"]
SEEDS = [1, 2, 3]
STEPS = np.arange(250, 10_001, 250)  # an episode ends every 250 env steps
T0 = 1_700_000_000


def synthetic_run(root, env_id, exp, seed):
    """Writes a run as the scripts do (and its .log and .done as run.py does); returns its known numbers."""
    rng = np.random.default_rng([seed, ENVS.index(env_id), VARIANTS.index(exp)])
    returns = np.round(rng.uniform(0, 100, len(STEPS)) + STEPS / 100, 2)
    evals = [(5_000, float(rng.integers(0, 500))), (10_000, float(rng.integers(0, 500)))]
    sps = float(rng.integers(1_000, 5_000))
    wall = 140.0 + 11 * (seed - 1)  # 140, 151, 162 s
    run_dir = f"runs/{env_id.replace('/', '-')}__{exp}__{seed}__{T0}"
    writer = SummaryWriter(str(root / run_dir))
    writer.add_text("hyperparameters", "|param|value|", walltime=T0)
    for step, value in zip(STEPS, returns):
        writer.add_scalar("charts/episodic_return", value, int(step), walltime=T0 + 1 + step / 100)
    if not (exp == "pqn_minatar" and env_id == "CartPole-v1"):  # this variant has no evaluation there
        for step, value in evals:
            writer.add_scalar("eval/episodic_return", value, step, walltime=T0 + 100)
    writer.add_scalar("charts/SPS", sps / 2, 5_000, walltime=T0 + 50)
    writer.add_scalar("charts/SPS", sps, 10_000, walltime=T0 + wall)
    writer.close()
    stem = logs(root, "bench") / f"{exp}__{env_id.replace('/', '-')}__{seed}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    (stem.parent / (stem.name + ".done")).write_text(run_dir + "\n")
    (stem.parent / (stem.name + ".log")).write_text(
        f"# command: python x.py --env-id {env_id} --seed {seed} --exp-name {exp} --k 1\n"
    )
    return dict(behaviour=returns[STEPS >= 9_000].mean(), greedy=evals[-1][1], sps=sps, wall=wall)


def cells_of_rows(lines):
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| env ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def table_rows(md):
    """The main table: {(env, variant): its other cells}."""
    return {(cells[0], cells[1]): cells[2:] for cells in cells_of_rows(md.split("<details>")[0].splitlines())}


def run_rows(md):
    """The table of every run: {(env, variant, seed): its other cells}."""
    section = md.split("<details>")[1].split("</details>")[0]
    return {(cells[0], cells[1], int(cells[2])): cells[3:] for cells in cells_of_rows(section.splitlines())}


def test_report_table_holds_means_and_stds_over_seeds_and_a_png(tmp_path):
    known = {
        (env_id, exp): [synthetic_run(tmp_path, env_id, exp, seed) for seed in SEEDS] for env_id in ENVS for exp in VARIANTS
    }
    # A run in runs/ that run.py did not finish for this benchmark does not count.
    writer = SummaryWriter(str(tmp_path / "runs" / f"CartPole-v1__pdqn__4__{T0}"))
    writer.add_scalar("charts/episodic_return", 1e6, 10_000)
    writer.close()

    result = call(
        REPORT, "--benchmark", "bench", "--root", str(tmp_path), "--machine", "a test machine", "--command", "bash x.sh"
    )
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "benchmark" / "results" / "bench.md").read_text()
    rows = table_rows(md)
    assert set(rows) == set(known)
    for key, runs in known.items():
        seeds, behaviour_iqm, behaviour, greedy_iqm, greedy, wall, sps = rows[key]
        assert seeds == "3"
        cells = [(behaviour_iqm, behaviour, [r["behaviour"] for r in runs])]
        if key == ("CartPole-v1", "pqn_minatar"):
            assert greedy == greedy_iqm == "—"  # no evaluation logged
        else:
            cells.append((greedy_iqm, greedy, [r["greedy"] for r in runs]))
        for iqm_cell, cell, values in cells:
            mean, std = (float(x) for x in cell.split(" ± "))
            assert mean == pytest.approx(np.mean(values), abs=0.05) and std == pytest.approx(np.std(values), abs=0.05)
            iqm, low, high = (float(x) for x in iqm_cell.replace("[", "").replace("]", "").replace(",", "").split())
            assert iqm == pytest.approx(np.mean(values), abs=0.05)  # 3 seeds: nothing is cut
            assert min(values) - 0.05 <= low <= iqm <= high <= max(values) + 0.05
        assert wall == "2 min 31 s"  # mean of 140, 151 and 162 s
        assert float(sps.replace(",", "")) == pytest.approx(np.mean([r["sps"] for r in runs]), abs=0.5)
    runs = run_rows(md)
    assert set(runs) == {(env_id, exp, seed) for env_id, exp in known for seed in SEEDS}
    for (env_id, exp, seed), (evals, behaviour, wall, sps, folder) in runs.items():
        run = known[env_id, exp][seed - 1]
        if (env_id, exp) == ("CartPole-v1", "pqn_minatar"):
            assert evals == "—"
        else:
            first, last = evals.split(", ")
            assert first.startswith("5k: ") and last == f"10k: {run['greedy']:.1f}"
        assert float(behaviour) == pytest.approx(run["behaviour"], abs=0.05)
        assert wall == f"2 min {9 + 11 * seed} s" and float(sps.replace(",", "")) == pytest.approx(run["sps"], abs=0.5)
        assert folder == f"`{env_id.replace('/', '-')}__{exp}__{seed}__{T0}`"
    assert "Machine: a test machine." in md and "Made with `bash x.sh`." in md
    assert "ddof = 0" in md
    assert "python x.py --env-id MinAtar/Breakout-v1 --seed S --exp-name pdqn --k 1    # S = 1–3" in md
    png = tmp_path / "benchmark" / "results" / "bench.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and "![learning curves](bench.png)" in md


@pytest.mark.parametrize(
    "name, message",
    [
        ("bench/sub", "error: --benchmark 'bench/sub': use letters, digits, '_', '-' and '.' only"),
        ("..", "error: --benchmark '..': use letters, digits, '_', '-' and '.' only"),
        ("bench", "error: cannot write to {root}/benchmark/results: it is a file, not a folder"),
    ],
)
def test_report_bad_input_is_one_error_line_before_the_runs_are_read(tmp_path, name, message):
    synthetic_run(tmp_path, "CartPole-v1", "pdqn", 1)
    (tmp_path / "benchmark" / "logs" / "bench" / "sub").mkdir()
    (tmp_path / "benchmark" / "results").write_text("a file where the results folder goes")
    result = call(REPORT, "--benchmark", name, "--root", str(tmp_path), "--no-plot")
    assert error_line(result).startswith(message.replace("{root}", str(tmp_path)))
    assert result.returncode == 2


def test_report_without_finished_runs_is_one_error_line(tmp_path):
    result = call(REPORT, "--benchmark", "nothing", "--root", str(tmp_path))
    assert (
        error_line(result)
        == f"error: benchmark 'nothing' has no finished runs (no .done files in {tmp_path}/benchmark/logs/nothing)"
    )
    assert result.returncode == 2


REINCARNATION = os.path.join(ROOT, "benchmark", "qdagger_reincarnation.py")

# Stands in for qdagger_dqn_atari_impalacnn.py with --total-timesteps 0: the TensorBoard files of phases 1
# and 2 (teacher score 30 + seed; a QDagger student scores seed * k / τ at step 1000 k, the TD-only student
# 1) and the line naming its saved model. Each run appends its argv to ./calls. The student of seed
# $FAKE_STOP_SEED writes its checkpoint (its argv, which --resume reads back) and waits for a Ctrl-C, on
# which it exits 130 as the real scripts do. With $FAKE_ERROR, every student stops as on bad input.
FAKE_STUDENT = """\
import argparse, json, os, signal, sys, time
from torch.utils.tensorboard import SummaryWriter
parser = argparse.ArgumentParser()
for flag in ("--teacher-model-path", "--env-id", "--seed", "--exp-name", "--offline-steps", "--offline-eval-frequency",
             "--resume"):
    parser.add_argument(flag)
parser.add_argument("--temperature", type=float, default=1.0)
parser.add_argument("--distillation", action=argparse.BooleanOptionalAction)
args, _ = parser.parse_known_args()
with open("calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_ERROR"):  # as the real scripts report bad input: one line, exit status 2
    print("error: " + os.environ["FAKE_ERROR"], file=sys.stderr)
    sys.exit(2)
if args.resume:
    run_dir = args.resume
    with open(f"{run_dir}/checkpoint.pt") as f:
        args, _ = parser.parse_known_args(json.load(f))
else:
    run_dir = f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    os.makedirs(run_dir)
    if args.seed == os.environ.get("FAKE_STOP_SEED"):
        with open(f"{run_dir}/checkpoint.pt", "w") as f:
            json.dump(sys.argv[1:], f)
        signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
        open("waiting", "w").close()
        time.sleep(60)
        sys.exit("not stopped")
assert os.path.isfile(args.teacher_model_path)
seed = int(args.seed)
teacher = SummaryWriter(f"{run_dir}/teacher")
teacher.add_scalar("charts/teacher/avg_episodic_return", 30 + seed, 0)
for step, score in [(900, 7), (1900, seed)]:
    teacher.add_scalar("charts/teacher/episodic_return", score, step)
teacher.close()
offline = SummaryWriter(f"{run_dir}/offline")
every = int(args.offline_eval_frequency)
for step in range(every, int(args.offline_steps) + 1, every):
    score = seed * step / every / args.temperature if args.distillation else 1
    offline.add_scalar("charts/offline/avg_episodic_return", score, step)
offline.close()
print(f"model saved to {run_dir}/{args.exp_name}.pt")
"""

REINCARNATION_FLAGS = ["--teacher", "teacher.pt", "--offline-steps", "3000", "--machine", "m"]


def reincarnation(root, *flags, env=None):
    # Up to four students, one after another, each starting Python and torch: minutes on a busy machine.
    return call(REINCARNATION, *REINCARNATION_FLAGS, "--root", str(root), *flags, cwd=root, env=env, timeout=300)


def test_qdagger_reincarnation_reports_each_seed_and_the_mean_and_skips_or_resumes_runs(tmp_path):
    (tmp_path / "qdagger_dqn_atari_impalacnn.py").write_text(FAKE_STUDENT)
    (tmp_path / "teacher.pt").write_text("")
    results = tmp_path / "benchmark" / "results"
    results.mkdir(parents=True)
    (results / "qdagger_reincarnation.md").write_text("# old page\n\n## Checks by hand (kept)\n\n- a check\n")

    # One student at a time: seed 1's two finish, then seed 2's first waits and a Ctrl-C stops it with the benchmark.
    flags = [*REINCARNATION_FLAGS, "--root", str(tmp_path), "--seeds", "1", "2", "--temperatures", "1", "--workers", "1"]
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # Ctrl-C's default action restored: a suite started in the background (`cmd &` in a script) has SIGINT ignored,
    # the processes it starts inherit that, and Python then never raises KeyboardInterrupt.
    first = subprocess.Popen(
        [sys.executable, REINCARNATION, *flags], cwd=tmp_path, env=dict(environ, FAKE_STOP_SEED="2"), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 300  # three students that each start Python and torch, on a machine that may be busy
    while not (tmp_path / "waiting").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "waiting").exists(), first.communicate(timeout=60)
    os.killpg(first.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the benchmark and its running student
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stdout + stderr
    assert stderr.strip() == "interrupted: run the same command again to run what has not finished"
    assert "exit 130" in stdout and "the next attempt resumes runs/Breakout-v5__qdagger_temperature_1__2__" in stdout
    assert len((tmp_path / "calls").read_text().splitlines()) == 3
    # Again with a second temperature: seed 1's students at τ = 1 are not run again, seed 2's stopped one
    # continues from its checkpoint, and the other three start.
    second = reincarnation(tmp_path, "--seeds", "1", "2", "--temperatures", "1", "0.5")
    assert second.returncode == 0, second.stderr
    assert "seed 1, qdagger_temperature_1: finished before" in second.stdout
    assert "seed 1, td_only: finished before" in second.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 7
    assert sum(" --seed 1 " in f" {c} " and " --temperature 1 " in f" {c} " for c in calls) == 1
    assert sum(" --temperature 0.5 " in f" {c} " for c in calls) == 2
    assert sum(c.startswith("--resume runs/Breakout-v5__qdagger_temperature_1__2__") for c in calls) == 1

    md = (results / "qdagger_reincarnation.md").read_text()
    # Final scores: QDagger seed * 3 / τ, TD-only 1; teachers 31 and 32.
    assert "| 1 | 31.0 | 3.0 | 6.0 | 1.0 | yes |" in md
    assert "| 2 | 32.0 | 6.0 | 12.0 | 1.0 | yes |" in md
    assert "| mean ± std | 31.5 ± 0.5 | 4.5 ± 1.5 | 9.0 ± 3.0 | 1.0 ± 0.0 | |" in md
    assert "τ = 0.5) ends at 9.0 on average, 29% of the teacher's 31.5, and is ahead of the TD-only student in 2 of 2" in md
    assert "| QDagger student (TD + distillation, τ = 1) | 1.5 | 3.0 | 4.5 |" in md  # the mean over seeds at each step
    assert "| TD-only student (`--no-distillation`) | 1.0 | 1.0 | 1.0 |" in md
    shown = "python qdagger_dqn_atari_impalacnn.py --env-id Breakout-v5 --seed 1 --exp-name td_only --teacher-model-path "
    assert shown + "teacher.pt " in md and md.count("--teacher-model-path teacher.pt ") == 6
    assert md.endswith("## Checks by hand (kept)\n\n- a check\n") and "# old page" not in md
    assert (results / "qdagger_reincarnation.png").stat().st_size > 0

    # Other flags make other students: those of the runs before are started again, not reused or resumed.
    third = reincarnation(tmp_path, "--seeds", "1", "--temperatures", "1", "--eval-episodes", "3")
    assert third.returncode == 0, third.stderr
    assert "finished before" not in third.stdout and len((tmp_path / "calls").read_text().splitlines()) == 9


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--teacher", "missing.pt"], "error: no teacher at missing.pt"),
        (["--seeds", "1", "1"], "error: --seeds has repeats: 1 1"),
        (["--temperatures", "0.1", "0.10"], "error: --temperatures has repeats: 0.1 0.1"),
        (["--temperatures", "nan"], "error: --temperatures must be positive numbers, got nan"),
        (["--temperatures", "0"], "error: --temperatures must be positive numbers, got 0"),
        (["--workers", "0"], "error: --workers must be positive, got 0"),
        (["--seeds", "one"], "error: argument --seeds: invalid int value: 'one'"),
        (["--teacher-steps", "0"], "error: --teacher-steps must be positive, got 0"),
        (["--offline-steps", "0"], "error: --offline-steps must be positive, got 0"),
        (["--offline-eval-frequency", "0"], "error: --offline-eval-frequency must be positive, got 0"),
        (["--eval-episodes", "-1"], "error: --eval-episodes must be positive, got -1"),
        (["--root", "elsewhere"], "error: --root elsewhere: no qdagger_dqn_atari_impalacnn.py in it"),
    ],
)
def test_qdagger_reincarnation_bad_input_is_one_error_line(tmp_path, flags, message):
    (tmp_path / "teacher.pt").write_text("")
    (tmp_path / "qdagger_dqn_atari_impalacnn.py").write_text(FAKE_STUDENT)
    (tmp_path / "elsewhere").mkdir()
    result = reincarnation(tmp_path, *flags)
    assert error_line(result) == message and result.returncode == 2
    assert not (tmp_path / "calls").exists()  # no student started


def test_qdagger_reincarnation_says_why_a_student_stopped_on_bad_input(tmp_path):
    (tmp_path / "teacher.pt").write_text("")
    (tmp_path / "qdagger_dqn_atari_impalacnn.py").write_text(FAKE_STUDENT)
    result = reincarnation(tmp_path, "--temperatures", "1", env={"FAKE_ERROR": "unknown envpool env id 'Nope-v5'"})
    log = os.path.join("benchmark", "logs", "qdagger_reincarnation", "qdagger_temperature_1__Breakout-v5__1.log")
    assert error_line(result) == (
        "error: 2 of 2 students did not finish; seed 1, qdagger_temperature_1 stopped with: unknown envpool env id "
        f"'Nope-v5' (see {log})"
    )
    assert result.returncode == 2


def test_report_without_matplotlib_says_how_to_install_it_or_writes_only_the_table(tmp_path):
    synthetic_run(tmp_path, "CartPole-v1", "pdqn", 1)
    no_matplotlib = tmp_path / "no_matplotlib" / "matplotlib"
    no_matplotlib.mkdir(parents=True)
    (no_matplotlib / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": str(no_matplotlib.parent)}
    result = call(REPORT, "--benchmark", "bench", "--root", str(tmp_path), env=env)
    assert (
        error_line(result)
        == "error: the learning curves need matplotlib: pip install -r requirements/plot.txt (or pass --no-plot)"
    )
    result = call(REPORT, "--benchmark", "bench", "--root", str(tmp_path), "--no-plot", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "benchmark" / "results")) == ["bench.md"]
    assert "| CartPole-v1 | pdqn | 1 |" in (tmp_path / "benchmark" / "results" / "bench.md").read_text()


def shell_script_env(**settings):
    """The environment for a benchmark shell script: this interpreter as PYTHON, and none of the
    scripts' settings from the caller's environment but `settings`."""
    names = (
        "SEEDS NUM_SEEDS WORKERS EXTRA_FLAGS SUFFIX RUNNER_FLAGS MACHINE PYTHON GAMES ENVS ATARI_ENVS LSTM_ENVS STUDENT_FLAGS"
    )
    env = {k: v for k, v in os.environ.items() if k not in names.split()}
    return dict(env, PYTHON=sys.executable, **settings)


def test_classic_control_trains_its_seeds_in_one_process_per_env():
    env = shell_script_env(RUNNER_FLAGS="--dry-run", SUFFIX="_dry_run_test")
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmark", "pqn.sh"), "classic"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("python ")]
    assert commands == [
        "python pqn.py --env-id CartPole-v1 --seed 1 --exp-name pqn --num-seeds 32",
        "python pqn.py --env-id Acrobot-v1 --seed 1 --exp-name pqn --num-seeds 32",
        "python pqn.py --env-id MountainCar-v0 --seed 1 --exp-name pqn --num-seeds 32 --exploration-fraction 0.1 "
        "--q-lambda 0.95",
    ]


def test_the_cartpole_epsilon_block_runs_three_schedules_of_32_seeds():
    env = shell_script_env(RUNNER_FLAGS="--dry-run", SUFFIX="_dry_run_test")
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmark", "pqn.sh"), "cartpole-epsilon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = [re.sub(r"^# skipped, already done \(.*?\): ", "", line) for line in result.stdout.splitlines()]
    assert [line for line in lines if line.startswith("python ")] == [
        "python pqn.py --env-id CartPole-v1 --seed 1 --exp-name pqn --num-seeds 32",
        "python pqn.py --env-id CartPole-v1 --seed 1 --exp-name pqn_end_e_0.2 --num-seeds 32 --end-e 0.2",
        "python pqn.py --env-id CartPole-v1 --seed 1 --exp-name pqn_purejaxql_epsilon --num-seeds 32 --end-e 0.2 "
        "--exploration-fraction 0.2",
    ]
    assert "--benchmark pqn_cartpole_epsilon_dry_run_test" in result.stdout


def test_seed_ranges_are_written_short():
    report = import_benchmark_tool("report")
    assert report.seed_ranges([1, 2, 3]) == "1–3"
    assert report.seed_ranges([5, 1, 2, 9, 10, 11, 12]) == "1, 2, 5, 9–12"
    assert report.seed_ranges([7]) == "7"


def test_learning_curve_bins_average_and_carry_forward():
    report = import_benchmark_tool("report")
    steps = np.array([5, 15, 250, 255, 900, 1000])
    x, curve = report.binned_curve(steps, np.array([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]), total=1000)
    assert len(x) == report.BINS == 50 and x[0] == 10 and x[-1] == 990  # centres of the bins [0, 20), [20, 40), ...
    assert curve[0] == 2.0 and curve[12] == 6.0 and curve[45] == 9.0 and curve[49] == 11.0  # means of the episodes in a bin
    assert np.all(curve[1:12] == 2.0) and np.all(curve[13:45] == 6.0) and np.all(curve[46:49] == 9.0)  # carried forward
    _, curve = report.binned_curve(np.array([500]), np.array([4.0]), total=1000)
    assert np.all(np.isnan(curve[:25])) and np.all(curve[25:] == 4.0)  # nothing before the first episode


@pytest.mark.parametrize("script", ["pqn.sh", "pdqn.sh", "qdagger.sh"])
def test_shell_scripts_print_their_commands_in_a_dry_run(script):
    path = os.path.join(ROOT, "benchmark", script)
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    # A benchmark name of its own, so that benchmarks already run in this checkout do not interfere.
    env = shell_script_env(
        RUNNER_FLAGS="--dry-run",
        SEEDS="1 2",
        NUM_SEEDS="1",
        EXTRA_FLAGS="--total-timesteps 1000",
        SUFFIX="_dry_run_test",
    )
    result = subprocess.run(["bash", path], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = {
        "pqn.sh": [
            "python pqn.py --env-id CartPole-v1 --seed 2 --exp-name pqn --total-timesteps 1000",
            "python pqn.py --env-id MountainCar-v0 --seed 1 --exp-name pqn --exploration-fraction 0.1 --q-lambda 0.95 "
            "--total-timesteps 1000",
            "python pqn_atari_envpool.py --env-id Pong-v5 --seed 1 --exp-name pqn --total-timesteps 1000",
            "python pqn_atari_envpool_lstm.py --env-id BeamRider-v5 --seed 2 --exp-name pqn --total-timesteps 1000",
        ],
        "pdqn.sh": [
            "python pdqn_minatar.py --env-id MinAtar/Seaquest-v1 --seed 2 --exp-name pdqn --eval-frequency 1000000 "
            "--total-timesteps 1000",
            "python pdqn_minatar.py --env-id MinAtar/Breakout-v1 --seed 1 --exp-name pqn_minatar --eval-frequency "
            "1000000 --planning-steps 0 --total-timesteps 1000",
        ],
        "qdagger.sh": [
            "python pqn_atari_envpool.py --env-id Breakout-v5 --seed 1 --exp-name pqn_teacher --save-model "
            "--total-timesteps 1000",
            "python qdagger_dqn_atari_impalacnn.py --env-id Breakout-v5 --seed 1 --exp-name qdagger "
            "--teacher-model-path '{run_dir:pqn_teacher}/pqn_teacher.pt' --total-timesteps 1000",
        ],
    }[script]
    # A command is printed to run, or as skipped when this repository has already finished it.
    lines = [re.sub(r"^# skipped, already done \(.*?\): ", "", line) for line in result.stdout.splitlines()]
    for command in expected:
        assert command in lines
    assert "# when the runs have finished: python benchmark/report.py --benchmark" in result.stdout


def test_speed_reads_progress_lines_and_the_steady_rate(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import speed

    fake = tmp_path / "fake_script.py"
    fake.write_text(
        "import sys, time\n"
        "for i in range(1, 5):\n"
        "    time.sleep(0.05)\n"
        "    print(f'step {i * 1000:>10,}/4,000 ({25 * i:5.1f}%)  SPS {i * 1500:>7,}  return(last 20 ep)     1.00', "
        "flush=True)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    points = speed.timed_progress([sys.executable, str(fake), "0"])
    assert [(step, total, sps) for _, step, total, sps in points] == [
        (1000, 4000, 1500),
        (2000, 4000, 3000),
        (3000, 4000, 4500),
        (4000, 4000, 6000),
    ]
    assert all(a[0] < b[0] for a, b in zip(points, points[1:]))
    # From the first line at 3/4 of the run (step 3,000 at 4 s) to the last (step 4,000 at 6 s).
    assert speed.steady_sps([(1.0, 1000, 4000, 0), (4.0, 3000, 4000, 0), (6.0, 4000, 4000, 0)]) == 500.0
    with pytest.raises(SystemExit, match="failed \\(exit 3\\)"):
        speed.timed_progress([sys.executable, str(fake), "3"])


SPEED = os.path.join(ROOT, "benchmark", "speed.py")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-envs", "0"], "error: --num-envs must be positive, got 0"),
        (["--num-envs", "8", "-3"], "error: --num-envs must be positive, got 8 -3"),
        (["--num-envs", "x"], "error: argument --num-envs: invalid int value: 'x'"),
        (["--total-timesteps", "0"], "error: --total-timesteps must be positive, got 0"),
        (["--env-id", "Nope-v5"], "error: --env-id 'Nope-v5': not an envpool Atari id"),
        (["--env-id", "CartPole-v1"], "error: --env-id 'CartPole-v1': not an envpool Atari id"),
        (["--scripts", "pqn.py"], "error: argument --scripts: invalid choice: 'pqn.py'"),
    ],
)
def test_speed_bad_input_is_one_error_line(flags, message):
    result = call(SPEED, *flags)
    assert error_line(result).startswith(message) and result.returncode == 2


def test_speed_times_envpool_alone_in_the_game_of_env_id(monkeypatch):
    speed = import_benchmark_tool("speed")
    commands = []

    def envpool_random_sps(command, **kwargs):  # stands in for benchmark/envpool_random_sps.py
        commands.append(command)
        if "Nope-v5" in command:
            return subprocess.CompletedProcess(command, 1, "", "no such env\n")
        return subprocess.CompletedProcess(command, 0, "Pong-v5: 8 envs, 12,345 env steps/s (random actions, 1.0 s)\n", "")

    monkeypatch.setattr(speed.subprocess, "run", envpool_random_sps)
    assert speed.envpool_sps("Pong-v5", 8, 4) == 12345.0
    command = commands[0]
    assert command[command.index("--env-id") + 1] == "Pong-v5" and command[-4:] == ["--num-envs", "8", "--stack-num", "4"]
    with pytest.raises(SystemExit, match="^error: .* failed \\(exit 1\\):\nno such env"):
        speed.envpool_sps("Nope-v5", 8, 4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "x"], "error: argument --seed: invalid int value: 'x'"),
        (["--bogus"], "error: unrecognized arguments: --bogus"),
        (["--seed", "-1"], "error: --seed must be in [0, 2**32 - 1], got -1"),
        (["--kill-after", "1"], "error: --kill-after must be between 0 and 1"),
        (["--", "--num-envs", "0"], "error: --num-envs must be positive"),  # pqn.py's own line, and only it
    ],
)
def test_resume_check_bad_input_is_one_error_line(flags, message):
    result = call(os.path.join(ROOT, "benchmark", "resume_check.py"), *flags)
    assert error_line(result).startswith(message) and result.returncode == 2


def test_a_run_directory_is_found_by_the_process_that_wrote_it(tmp_path):
    # Two runners started runs of the same prefix at the same time (two scripts with the same exp
    # name, env and seed): each takes the directory its own process wrote to.
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    import run

    for stamp, pid in [(100, 4321), (101, 8765)]:
        (tmp_path / "runs" / f"A__e__1__{stamp}").mkdir(parents=True)
        (tmp_path / "runs" / f"A__e__1__{stamp}" / f"events.out.tfevents.{stamp}.host.{pid}.0").write_text("")
    assert run.find_run_dir(str(tmp_path), "A__e__1__", 0, set(), pid=4321) == os.path.join("runs", "A__e__1__100")
    assert run.find_run_dir(str(tmp_path), "A__e__1__", 0, set(), pid=8765) == os.path.join("runs", "A__e__1__101")
    assert run.find_run_dir(str(tmp_path), "A__e__1__", 0, set()) == os.path.join("runs", "A__e__1__101")  # the newest


def reference_iqm(scores):
    """Written out: sort, drop the lowest and highest quarter (rounded down), average the rest."""
    ordered = sorted(float(x) for x in scores)
    cut = len(ordered) // 4
    middle = ordered[cut : len(ordered) - cut]
    return sum(middle) / len(middle)


def test_iqm_against_a_written_out_reference():
    report = import_benchmark_tool("report")

    assert report.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5  # 3, 4, 5, 6
    assert report.iqm([5.0]) == 5.0 and report.iqm([1, 2, 30]) == 11.0  # fewer than 4: the mean
    rng = np.random.default_rng(0)
    for n in [4, 5, 7, 10, 33]:
        scores = rng.normal(size=n) * 100
        assert report.iqm(scores) == pytest.approx(reference_iqm(scores), rel=1e-12)


def test_stratified_bootstrap_against_a_written_out_reference():
    report = import_benchmark_tool("report")

    tasks = [np.array([1.0, 4.0, 2.0, 8.0, 3.0]), np.array([10.0, 0.0, 5.0])]
    low, high = report.stratified_bootstrap_ci(tasks, reps=500, seed=7)
    # The same resamples, drawn and reduced one by one: each task resampled within itself.
    rng = np.random.default_rng(7)
    stats = []
    for _ in range(500):
        pooled = []
        for task in tasks:
            pooled += [task[i] for i in rng.integers(0, len(task), len(task))]
        stats.append(reference_iqm(pooled))
    stats.sort()
    assert low == pytest.approx(np.percentile(stats, 2.5)) and high == pytest.approx(np.percentile(stats, 97.5))
    assert low < reference_iqm(np.concatenate(tasks)) < high
    assert report.stratified_bootstrap_ci([np.full(6, 3.0)]) == (3.0, 3.0)


def test_aggregate_iqm_of_normalised_scores():
    report = import_benchmark_tool("report")

    def runs(values):
        return [dict(behaviour=v, greedy=v) for v in values]

    groups = {
        ("Breakout-v5", "a"): runs([30.5, 1.7, 16.1]),
        ("Pong-v5", "a"): runs([14.6, -20.7, -3.05]),
        ("MinAtar/Breakout-v1", "a"): runs([10.0, 20.0]),
        ("MinAtar/Asterix-v1", "a"): runs([4.0, 4.0]),
        ("MinAtar/Breakout-v1", "b"): runs([5.0, 5.0]),
        ("MinAtar/Asterix-v1", "b"): runs([8.0, 8.0]),
    }
    envs = sorted({env for env, _ in groups})
    lines = report.aggregate_lines(groups, envs, ["a", "b"])
    table = {
        line.split("|")[1].strip() + "/" + section: line
        for section, block in zip(["MinAtar", "Atari"], "\n".join(lines).split("### ")[1:])
        for line in block.splitlines()
        if line.startswith("| a") or line.startswith("| b")
    }
    # Atari: human-normalised 1, 0, 0.5 in both games -> IQM over the 6 runs (0, 0.5, 0.5, 1 after the cut) = 0.5.
    assert "| a | 2 | 0.50 [" in table["a/Atari"]
    # MinAtar: Breakout's best mean is a's 15 -> a: 0.667, 1.333; b: 0.333, 0.333. Asterix's best is b's 8 -> a: 0.5, 0.5;
    # b: 1, 1.
    assert f"| a | 2 | {reference_iqm([10 / 15, 20 / 15, 0.5, 0.5]):.2f} [" in table["a/MinAtar"]
    assert f"| b | 2 | {reference_iqm([1 / 3, 1 / 3, 1.0, 1.0]):.2f} [" in table["b/MinAtar"]
    assert "| b | 2 | — | — |" in table["b/Atari"]  # b has no Atari runs
