"""Runs the `script × env × seed` commands of a benchmark, a few at a time, and resumes where it stopped.

    python benchmark/run.py --benchmark pqn_classic_control --exp-name pqn --script pqn.py \\
        --env-ids CartPole-v1 Acrobot-v1 --seeds 1 2 3 --workers 2 -- --total-timesteps 500000

Each command is `python SCRIPT --env-id ENV --seed S --exp-name EXP [the flags after --]`, run from
--root (the repository root) with the Python that runs this file, and with OMP_NUM_THREADS=1 unless
it is set in the environment (the networks are small: one thread per run is fastest).

The flags after `--` may hold placeholders: `{env_id}`, `{seed}`, and `{run_dir:EXP}`, the run
directory that the finished run of exp-name EXP made in the same benchmark for the same env and seed
(the QDagger student gets its teacher with `--teacher-model-path {run_dir:pqn_teacher}/pqn_teacher.pt`).

Files, under --root:
  benchmark/logs/<benchmark>/<exp>__<env>__<seed>.log   stdout and stderr of the run (kept when it fails)
  benchmark/logs/<benchmark>/<exp>__<env>__<seed>.done  written only when it exits 0: the run directory
                                                          it made, runs/<env>__<exp>__<seed>__<unix time>
(a `/` in an env id becomes `-`). With --num-seeds N (pqn.py's --num-seeds: N agents in one process,
with seeds S ... S + N - 1), each seed of --seeds starts a command with `--seed S --num-seeds N`, and
each of its agents gets a .done marker (and a .log naming the command) as if it had run alone; the
command's output is in the log of its first seed. A command whose .done markers all exist is
skipped, so running the same command again after an interruption (Ctrl-C: exit status 130) runs
only what is missing; a run stopped by a signal after writing its checkpoint (Ctrl-C, SIGTERM, a
kill) continues from it with --resume (its directory is in <exp>__<env>__<seed>.resume; its output
goes on in the same .log). That marker is written as soon as the run has made its directory, so a
run killed together with this runner (the machine or the session went down) also continues, from
its last periodic checkpoint; one killed before its first checkpoint starts again. A .done made by
another command (other flags) is an error: give such a benchmark another --benchmark name. Failed
runs do not stop the others; they are listed at the end and the exit status is 1.

--slurm writes one job file per command to benchmark/logs/<benchmark>/slurm/ from
benchmark/slurm_template.sbatch and submits it with `sbatch`; the job writes the same log and .done
files. A job that uses {run_dir:EXP} starts after the job of EXP (--dependency=afterok) when that was
submitted and has not finished. A command submitted before (its slurm/*.jobid exists) is not
submitted again. A job asks Slurm for SIGTERM five minutes before its time limit and passes it to
the run, which stops with a checkpoint; the job then writes the run directory to
<exp>__<env>__<seed>.resume and requeues itself, and the requeued job continues the run with
`--resume`. With --dry-run nothing is run or submitted: the commands are printed (with --slurm,
the job files are written and the sbatch commands printed).

benchmark/report.py turns the finished runs of a benchmark into a table and learning curves.
"""

import argparse
import concurrent.futures
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_template.sbatch")
# `{env_id}`, `{seed}` or `{run_dir:EXP}` in the flags after `--`.
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
MARK_POLL_S = 5  # how often a running command is checked for the run directory it made


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(message):
    """Bad input: one `error: ...` line on stderr and exit status 2 (used by report.py too)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_benchmark_name(benchmark):
    """A --benchmark names a directory under benchmark/logs/ and benchmark/results/ (used by report.py too)."""
    if not re.fullmatch(r"[\w.-]+", benchmark) or benchmark in (".", ".."):
        fail(f"--benchmark {benchmark!r}: use letters, digits, '_', '-' and '.' only (it names a directory)")


def check_writable(directory):
    """A folder that cannot be made or written to is one error line before anything runs (used by report.py too)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        fail(f"cannot write to {directory}: it is a file, not a folder")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        fail(f"cannot write to {directory}: {e.strerror}")


def logs_dir(root, benchmark):
    """Where the logs and .done markers of a benchmark go (used by report.py too)."""
    return os.path.join(root, "benchmark", "logs", benchmark)


def format_duration(seconds):
    """3 s, 2 min 31 s, 1 h 05 min (used by report.py too)."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Job:
    """One command of the benchmark: its flags (placeholders not yet resolved) and its file names."""

    def __init__(self, args, env_id, seed):
        self.env_id, self.seed, self.exp_name = env_id, seed, args.exp_name
        self.argv = ["python", args.script, "--env-id", env_id, "--seed", str(seed), "--exp-name", args.exp_name]
        if args.num_seeds > 1:
            self.argv += ["--num-seeds", str(args.num_seeds)]
        # {env_id} and {seed} now; {run_dir:EXP} when the command starts (that run may not have finished yet).
        known = {"env_id": env_id, "seed": str(seed)}
        self.argv += [PLACEHOLDER.sub(lambda m: known.get(m[1], m[0]), flag) for flag in args.extra]
        self.stem = stem(args.exp_name, env_id, seed)
        directory = logs_dir(args.root, args.benchmark)
        self.log, self.done = (os.path.join(directory, self.stem + ext) for ext in (".log", ".done"))
        # The run directory of a run stopped with a checkpoint, which the next attempt continues with --resume.
        self.resume = os.path.join(directory, self.stem + ".resume")
        self.job_file = os.path.join(directory, "slurm", self.stem + ".sbatch")
        self.job_id_file = os.path.join(directory, "slurm", self.stem + ".jobid")
        # `runs/<this prefix><unix time>` is the directory the script makes (the README's Logged metrics).
        self.run_prefix = f"{env_id.replace('/', '-')}__{args.exp_name}__{seed}__"
        # The agents of a --num-seeds command after the first: (seed, .log, .done, run prefix) of each;
        # their run directories carry the first one's unix time.
        self.other_agents = [
            (
                s,
                *(os.path.join(directory, stem(args.exp_name, env_id, s) + ext) for ext in (".log", ".done")),
                f"{env_id.replace('/', '-')}__{args.exp_name}__{s}__",
            )
            for s in range(seed + 1, seed + args.num_seeds)
        ]
        # The runs this one needs: {exp: its .done file}, from the {run_dir:EXP} placeholders.
        self.needs = {exp: os.path.join(directory, stem(exp, env_id, seed) + ".done") for exp in needed_runs(args.extra)}

    def resolved_argv(self, missing=None):
        """The command with {run_dir:EXP} replaced by that run's directory. A run that has not finished
        raises RuntimeError, or, if `missing` is given, is replaced by missing(exp, done_file)."""
        values = {}
        for exp, done in self.needs.items():
            if os.path.exists(done):
                values[exp] = read_marker(done)
            elif missing is not None:
                values[exp] = missing(exp, done)
            else:
                raise RuntimeError(
                    f"needs the run of --exp-name {exp} for {self.env_id} seed {self.seed}, which has not finished (no {done})"
                )
        return [PLACEHOLDER.sub(lambda m: values[m[1].split(":", 1)[1]], flag) for flag in self.argv]

    def command(self):
        """The command as shown and logged, with its {run_dir:EXP} placeholders (the same for every run)."""
        return shlex.join(self.argv)

    def markers(self):
        """(.log, .done) of every agent of the command, the first agent's first."""
        return [(self.log, self.done)] + [(log, done) for _, log, done, _ in self.other_agents]

    def finished(self):
        return all(os.path.exists(done) for _, done in self.markers())

    def mark_other_agents(self, run_dir):
        """Writes the .log and .done of the agents after the first, whose directories are named like `run_dir`."""
        stamp = run_dir.rsplit("__", 1)[1]
        for seed, log, done, prefix in self.other_agents:
            with open(log, "w", encoding="utf-8") as f:
                f.write(f"# command: {self.command()}\n{other_agent_note(seed, self)}\n")
            write_marker(done, os.path.join(os.path.dirname(run_dir), prefix + stamp))


def other_agent_note(seed, job):
    """The second line of the log of an agent after the first of a --num-seeds command."""
    return f"# the agent with seed {seed} of this command; its output is in {os.path.basename(job.log)}"


def show(path):
    """A path as printed: relative to the current directory when it is under it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def stem(exp_name, env_id, seed):
    return f"{exp_name}__{env_id.replace('/', '-')}__{seed}"


def write_marker(path, run_dir):
    """Writes a .done or .resume marker whole or not at all."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(run_dir + "\n")
    os.replace(path + ".tmp", path)


def read_marker(path):
    """The first line of a .done, .resume or .jobid marker; bytes that are not UTF-8 read as replacement characters."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.readline().strip()


def logged_command(log):
    """The command a run's log starts with (`# command: ...`), or None. A log that is not UTF-8 (a run's
    output can be anything) is read with replacement characters, which no command of this runner has."""
    if not os.path.exists(log):
        return None
    with open(log, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return first[len("# command: ") :].rstrip("\n") if first.startswith("# command: ") else None


def needed_runs(flags):
    """The EXPs of the {run_dir:EXP} placeholders; any other placeholder than these is an error."""
    exps = []
    for flag in flags:
        for name in PLACEHOLDER.findall(flag):
            if name.startswith("run_dir:") and name[len("run_dir:") :]:
                exps.append(name[len("run_dir:") :])
            elif name not in ("env_id", "seed"):
                fail(
                    f"unknown placeholder {{{name}}} in {flag!r}: the flags after -- may use {{env_id}}, {{seed}} and "
                    f"{{run_dir:EXP}}"
                )
    return list(dict.fromkeys(exps))


def find_run_dir(root, run_prefix, start, before, pid=None, own_only=False):
    """The newest runs/<run_prefix><unix time> with time >= start that did not exist before the run.
    Another runner may have started a run with the same prefix meanwhile (another script with the
    same exp name, env and seed): the directory whose TensorBoard file the run's own process `pid`
    wrote (the file name holds the writer's pid) is taken first, and with own_only it is the only one."""
    found = []
    for path in glob.glob(os.path.join(root, "runs", glob.escape(run_prefix) + "*")):
        stamp = os.path.basename(path)[len(run_prefix) :]
        if stamp.isdigit() and int(stamp) >= int(start) and path not in before and os.path.isdir(path):
            found.append((int(stamp), path))
    own = [
        (stamp, path)
        for stamp, path in found
        if pid is not None and glob.glob(os.path.join(glob.escape(path), f"events.out.tfevents.*.{pid}.*"))
    ]
    found = own if own_only else own or found
    return os.path.relpath(max(found)[1], root) if found else None


def run_local(job, root):
    """Runs one command; returns (ok, message). Writes its log, and the .done marker when it exits 0.
    A run stopped by a signal after writing its checkpoint (Ctrl-C, SIGTERM, a kill) leaves a .resume
    marker, and the next attempt continues that run with --resume instead of starting it again."""
    resume_dir = read_marker(job.resume) if os.path.exists(job.resume) else None
    fresh_note = None
    if resume_dir and not os.path.isfile(os.path.join(root, resume_dir, "checkpoint.pt")):
        # The runner was killed with the run before the run wrote its first checkpoint.
        fresh_note = f"# {resume_dir} has no checkpoint to continue from: starting the run again\n"
        os.remove(job.resume)
        resume_dir = None
    if resume_dir:
        argv = [*job.argv[:2], "--resume", resume_dir]  # the run's flags are in its checkpoint
    else:
        try:
            argv = job.resolved_argv()
        except RuntimeError as e:
            with open(job.log, "w", encoding="utf-8") as f:
                f.write(f"# command: {job.command()}\nerror: {e}\n")
            return False, str(e)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    before = set(glob.glob(os.path.join(root, "runs", glob.escape(job.run_prefix) + "*")))
    start = time.time()
    # A resumed run's output goes on in the log of the attempt it continues.
    with open(job.log, "a" if resume_dir else "w", encoding="utf-8") as log:
        if not resume_dir:
            log.write(f"# command: {job.command()}\n")
        if fresh_note:
            log.write(fresh_note)
        if argv != job.argv:
            log.write(f"# resolved: {shlex.join(argv)}\n")
        log.write(f"# started: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        # "python" in the shown command is the interpreter that runs this file.
        process = subprocess.Popen([sys.executable] + argv[1:], cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
        # The .resume marker names the run directory as soon as the run has made it: if this runner dies
        # with its run (a kill -9, the machine or the session going down), the next attempt continues
        # the run from its last periodic checkpoint.
        marked = False
        while True:
            try:
                status = process.wait(timeout=MARK_POLL_S)
                break
            except subprocess.TimeoutExpired:
                if not resume_dir and not marked:
                    own = find_run_dir(root, job.run_prefix, start, before, process.pid, own_only=True)
                    if own:
                        write_marker(job.resume, own)
                        marked = True
        elapsed = time.time() - start
        log.write(f"# exit status {status} after {format_duration(elapsed)}\n")
    run_dir = resume_dir or find_run_dir(root, job.run_prefix, start, before, process.pid)
    if status != 0:
        how = f"killed by signal {-status}" if status < 0 else f"exit {status}"
        stopped = status < 0 or status in (128 + signal.SIGINT, 128 + signal.SIGTERM)
        if stopped and run_dir and os.path.isfile(os.path.join(root, run_dir, "checkpoint.pt")):
            write_marker(job.resume, run_dir)
            return False, f"{how} after {format_duration(elapsed)}; the next attempt resumes {run_dir}"
        if marked:  # a run that failed (not stopped) starts again next time
            os.remove(job.resume)
        return False, f"{how} after {format_duration(elapsed)}"
    if run_dir is None:
        return False, f"exit 0 but it made no runs/{job.run_prefix}<unix time> directory"
    write_marker(job.done, run_dir)
    job.mark_other_agents(run_dir)
    if resume_dir or marked:
        os.remove(job.resume)
    return True, f"finished in {format_duration(elapsed)}: {run_dir}"


def run_all(todo, root, workers):
    """Runs the jobs `workers` at a time, printing when each starts and how it ends: [(ok, message)] in the
    order of `todo`, or None when interrupted (Ctrl-C). The running commands get the Ctrl-C too and stop
    with their checkpoints (their .resume markers are written before this returns); no more start."""
    lock, stop = threading.Lock(), threading.Event()

    def one(number, job):
        if stop.is_set():
            return False, "not started (interrupted)"
        with lock:
            print(f"[{number}/{len(todo)}] start: {job.command()}", flush=True)
        ok, message = run_local(job, root)
        with lock:
            print(
                f"[{number}/{len(todo)}] {'done' if ok else 'FAILED'}: {message}" + ("" if ok else f" (log: {show(job.log)})"),
                flush=True,
            )
        return ok, message

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, number, job) for number, job in enumerate(todo, 1)]
        try:
            for _ in concurrent.futures.as_completed(futures):
                pass
        except KeyboardInterrupt:
            stop.set()
            print("interrupted: run the same command again to run what has not finished", file=sys.stderr)
            return None
    return [future.result() for future in futures]


def write_job_file(job, args):
    """Fills the slurm template (its text read by parse_args) for one job; returns the `sbatch` command that submits it."""
    text = args.template
    resources = [f"#SBATCH --cpus-per-task={args.slurm_cpus}", f"#SBATCH --time={args.slurm_time}"]
    if args.slurm_gpus:
        resources.append(f"#SBATCH --gres=gpu:{args.slurm_gpus}")
    if args.slurm_partition:
        resources.append(f"#SBATCH --partition={args.slurm_partition}")
    # A run this one needs is read from its .done marker when the job starts, and must have finished.
    requires = [
        f"[ -f {shlex.quote(done)} ] || "
        f'{{ echo "error: the run of --exp-name {exp} for this env and seed has not finished (no {done})"; exit 1; }}'
        for exp, done in job.needs.items()
    ]

    def shell_word(flag):
        # A {run_dir:EXP} of a run that has not finished yet is read from its .done when the job runs;
        # resolved_argv below puts the path of that .done between two \0.
        parts = flag.split("\0")
        return "".join(
            f'"$(head -n 1 {shlex.quote(p)})"' if i % 2 else (shlex.quote(p) if p else "") for i, p in enumerate(parts)
        )

    command = " ".join(shell_word(flag) for flag in job.resolved_argv(missing=lambda exp, done: f"\0{done}\0"))
    fields = {
        "job_name": f"{args.benchmark}__{job.stem}",
        "log": job.log,
        "resources": "\n".join(resources),
        "root": shlex.quote(args.root),
        "omp_threads": shlex.quote(os.environ.get("OMP_NUM_THREADS", "1")),
        "header": shlex.quote(f"# command: {job.command()}"),
        "requires": "\n".join(requires),
        "command": command,
        "run_prefix": shlex.quote(job.run_prefix),
        "done": shlex.quote(job.done),
        # Where a job stopped by SIGTERM leaves the run directory its requeued job continues.
        "resume": shlex.quote(job.resume),
        "resume_command": shlex.join([*job.argv[:2], "--resume"]),
        # The agents after the first of a --num-seeds command: their directories carry the first one's unix time.
        "other_agents": "\n".join(
            f"printf '%s\\n' {shlex.quote(f'# command: {job.command()}')} {shlex.quote(other_agent_note(seed, job))} "
            f"> {shlex.quote(log)}\n"
            f'echo "runs/{prefix}${{run_dir##*__}}" > {shlex.quote(done)}'
            for seed, log, done, prefix in job.other_agents
        ),
    }
    for name, value in fields.items():
        text = text.replace("{{" + name + "}}", value)
    unfilled = re.search(r"\{\{\w+\}\}", text)
    if unfilled:
        fail(f"{args.slurm_template} has a placeholder this runner does not fill: {unfilled[0]}")
    os.makedirs(os.path.dirname(job.job_file), exist_ok=True)
    with open(job.job_file, "w", encoding="utf-8") as f:
        f.write(text)
    sbatch = ["sbatch", "--parsable"]
    # Start after the jobs of the runs this one needs, if they were submitted and have not finished.
    waits = []
    for exp, done in job.needs.items():
        id_file = os.path.join(os.path.dirname(job.job_id_file), stem(exp, job.env_id, job.seed) + ".jobid")
        if not os.path.exists(done) and os.path.exists(id_file):
            waits.append(read_marker(id_file))
    if waits:
        sbatch.append("--dependency=afterok:" + ":".join(waits))
    return sbatch + [job.job_file]


def read_template(path):
    """The text of the slurm job file template, read before any job file is written."""
    if not os.path.isfile(path):
        fail(f"--slurm-template {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        fail(f"--slurm-template {path}: not a text file (not UTF-8)")
    except OSError as e:
        fail(f"--slurm-template {path}: {e.strerror}")


def parse_args(argv):
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = Parser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --benchmark NAME --exp-name EXP --script SCRIPT --env-ids ENV [ENV ...] [options] [-- FLAGS]",
        epilog="FLAGS (after --) are passed to every command; they may use {env_id}, {seed} and {run_dir:EXP}.",
    )
    parser.add_argument(
        "--benchmark", required=True, help="name of the benchmark: benchmark/logs/<name>/, report.py --benchmark <name>"
    )
    parser.add_argument("--exp-name", required=True, help="the --exp-name of the runs (a variant in the report)")
    parser.add_argument("--script", required=True, help="the script to run, relative to --root, e.g. pqn.py")
    parser.add_argument("--env-ids", nargs="+", required=True, metavar="ENV", help="the env ids")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], metavar="S", help="the seeds (default: 1 2 3)")
    parser.add_argument(
        "--num-seeds",
        type=int,
        default=1,
        metavar="N",
        help="agents per command, seeds S ... S + N - 1 in one process (the script's --num-seeds; default: 1)",
    )
    parser.add_argument("--workers", type=int, default=1, help="how many runs at a time (default: 1)")
    parser.add_argument(
        "--root", default=ROOT, help="where the commands run and runs/ and benchmark/logs/ are (default: the repository root)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only print the commands (with --slurm: write the job files and print the sbatch commands)",
    )
    parser.add_argument(
        "--slurm", action="store_true", help="submit one slurm job per command with sbatch instead of running them here"
    )
    parser.add_argument(
        "--slurm-template", default=TEMPLATE, help="the job file template (default: benchmark/slurm_template.sbatch)"
    )
    parser.add_argument("--slurm-cpus", type=int, default=1, help="#SBATCH --cpus-per-task (default: 1)")
    parser.add_argument("--slurm-gpus", type=int, default=0, help="#SBATCH --gres=gpu:N when N > 0 (default: 0)")
    parser.add_argument("--slurm-time", default="24:00:00", help="#SBATCH --time (default: 24:00:00)")
    parser.add_argument("--slurm-partition", help="#SBATCH --partition (default: none)")
    args = parser.parse_args(own)
    args.extra = extra
    args.root = os.path.abspath(args.root)
    check_benchmark_name(args.benchmark)
    if not re.fullmatch(r"[\w.-]+", args.exp_name) or "__" in args.exp_name:
        fail(f"--exp-name {args.exp_name!r}: use letters, digits, '_', '-' and '.' only, without '__'")
    if not os.path.isfile(os.path.join(args.root, args.script)):
        fail(f"--script {args.script}: no such file in {args.root}")
    if args.workers < 1:
        fail(f"--workers {args.workers}: must be at least 1")
    if args.num_seeds < 1:
        fail(f"--num-seeds {args.num_seeds}: must be at least 1")
    if min(args.seeds) < 0:  # the scripts' seeds are numpy seeds
        fail(f"--seeds {' '.join(map(str, args.seeds))}: seeds must not be negative")
    if args.slurm_cpus < 1:
        fail(f"--slurm-cpus {args.slurm_cpus}: must be at least 1")
    if args.slurm_gpus < 0:
        fail(f"--slurm-gpus {args.slurm_gpus}: must not be negative")
    seeds = sorted(set(args.seeds))
    if any(b - a < args.num_seeds for a, b in zip(seeds, seeds[1:])):
        fail(
            f"--seeds {' '.join(map(str, args.seeds))} with --num-seeds {args.num_seeds}: the agents of two commands "
            f"would share seeds; space the seeds at least {args.num_seeds} apart"
        )
    for flag in extra:
        if flag.split("=")[0] in ("--env-id", "--seed", "--exp-name", "--num-seeds"):
            fail(f"{flag} after --: give it to the runner as --env-ids, --seeds, --exp-name or --num-seeds")
    if args.slurm:
        args.template = read_template(args.slurm_template)
    if args.slurm and not args.dry_run and shutil.which("sbatch") is None:
        fail("--slurm: sbatch is not on PATH (with --dry-run the job files are written and not submitted)")
    needed_runs(extra)  # checks the placeholders
    # Where the logs (or the job files) will go; a dry run without --slurm writes nothing.
    if args.slurm:
        check_writable(os.path.join(logs_dir(args.root, args.benchmark), "slurm"))
    elif not args.dry_run:
        check_writable(logs_dir(args.root, args.benchmark))
    return args


def main(argv):
    args = parse_args(argv)
    jobs = [Job(args, env_id, seed) for env_id in dict.fromkeys(args.env_ids) for seed in dict.fromkeys(args.seeds)]
    # A finished run counts only for the same command: a benchmark made with other flags is not resumed.
    conflicts = [
        job
        for job in jobs
        if any(os.path.exists(done) and logged_command(log) not in (None, job.command()) for log, done in job.markers())
    ]
    if conflicts:
        fail(
            f"{len(conflicts)} of these runs already finished in benchmark {args.benchmark!r} with another command "
            f"(see {show(conflicts[0].log)}): use another --benchmark name, or delete "
            f"{show(logs_dir(args.root, args.benchmark))}"
        )
    todo = [job for job in jobs if not job.finished()]
    for job in jobs:
        if job not in todo:
            print(f"# skipped, already done ({read_marker(job.done)}): {job.command()}")
    if args.slurm:
        return submit(args, todo, len(jobs))
    if args.dry_run:
        for job in todo:
            print(job.command())
        print(f"# {len(jobs)} commands: {len(todo)} to run, {len(jobs) - len(todo)} already done")
        return 0
    os.makedirs(logs_dir(args.root, args.benchmark), exist_ok=True)
    results = run_all(todo, args.root, args.workers)
    if results is None:
        return 130
    failures = [(job, message) for job, (ok, message) in zip(todo, results) if not ok]
    finished = len(todo) - len(failures)
    skipped = len(jobs) - len(todo)
    print(
        f"{args.benchmark}/{args.exp_name}: {len(jobs)} commands, {finished} finished, {skipped} skipped (already "
        f"done), {len(failures)} failed"
    )
    for job, message in failures:
        print(f"  FAILED: {job.command()}\n    {message}; log: {show(job.log)}")
    return 1 if failures else 0


def submit(args, todo, total):
    """--slurm: writes a job file per command and submits it (with --dry-run, only shows the sbatch commands)."""
    submitted, failures = 0, []
    for job in todo:
        if os.path.exists(job.job_id_file) and not args.dry_run:
            print(
                f"# skipped, submitted before as job {read_marker(job.job_id_file)} (delete {job.job_id_file} to "
                f"submit again): {job.command()}"
            )
            continue
        sbatch = write_job_file(job, args)
        if args.dry_run:
            print(shlex.join(sbatch))
            continue
        result = subprocess.run(sbatch, cwd=args.root, capture_output=True, text=True)
        if result.returncode != 0:
            failures.append((job, (result.stderr or result.stdout).strip() or f"sbatch exit {result.returncode}"))
            continue
        job_id = result.stdout.strip().split(";")[0]
        with open(job.job_id_file, "w", encoding="utf-8") as f:
            f.write(job_id + "\n")
        submitted += 1
        print(f"submitted job {job_id}: {job.command()}")
    if args.dry_run:
        print(
            f"# {total} commands: {len(todo)} job files written to "
            f"{show(os.path.join(logs_dir(args.root, args.benchmark), 'slurm'))}, not submitted"
        )
        return 0
    print(
        f"{args.benchmark}/{args.exp_name}: {total} commands, {submitted} submitted, {total - len(todo)} skipped "
        f"(already done), {len(failures)} failed to submit"
    )
    for job, message in failures:
        print(f"  FAILED: {job.job_file}: {message}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
