"""Does a student reincarnated from a teacher get good fast? QDagger's offline phase with and without distillation.

    python benchmark/qdagger_reincarnation.py --teacher runs/<run>/pqn_atari_envpool.pt --seeds 1 2 3

For each seed, runs qdagger_dqn_atari_impalacnn.py with that seed (so the same teacher games fill the
same teacher buffer in phase 1) and `--total-timesteps 0` (the run ends after phase 2): as QDagger
(TD + distillation) once per `--temperatures` τ, and once with `--no-distillation` (TD alone), each
for `--offline-steps` gradient steps on `--teacher-steps` teacher transitions; `--workers` of these
students at a time. The students run as benchmark/run.py runs its commands: run again, it skips the
students that finished with the same command and continues those stopped with a checkpoint (Ctrl-C)
with --resume, so a stopped benchmark goes on where it was.

Writes benchmark/results/qdagger_reincarnation.md: per seed the teacher's greedy score and each
student's at the end of phase 2 (whole games, `--eval-episodes` of them), and whether all students
of the seed learned from the same teacher games; over the seeds the mean scores along phase 2; and
the commands. A section `## Checks by hand` of the page written before is kept. And
benchmark/results/qdagger_reincarnation.png: the students' greedy scores against gradient steps,
per seed and their mean, beside the teacher's. Logs go to benchmark/logs/qdagger_reincarnation/.
"""

import argparse
import math
import os
import shlex
import sys

import numpy as np
from report import import_pyplot, read_run
from run import ROOT, Job, fail, format_duration, logged_command, logs_dir, read_marker, run_all

NAME = "qdagger_reincarnation"
SCRIPT = "qdagger_dqn_atari_impalacnn.py"
KEPT_SECTION = "## Checks by hand"


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="a pqn_atari_envpool.py --save-model file")
    parser.add_argument("--env-id", default="Breakout-v5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one set of students per seed")
    parser.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[1.0, 0.1],
        help="one QDagger student per τ and seed (default: cleanrl's τ and the QDagger authors')",
    )
    parser.add_argument("--workers", type=int, default=2, help="students trained at a time (one thread each)")
    parser.add_argument("--teacher-steps", type=int, default=50_000)
    parser.add_argument("--offline-steps", type=int, default=5_000)
    parser.add_argument("--offline-eval-frequency", type=int, default=1_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--machine", default="", help="the machine line of the report")
    parser.add_argument("--root", default=ROOT, help="where runs/ and benchmark/ are (the repository root)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.teacher):
        fail(f"no teacher at {args.teacher}")
    for name in ("seeds", "temperatures"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            fail(f"--{name} has repeats: {' '.join(f'{v:g}' for v in values)}")
    if not all(math.isfinite(t) and t > 0 for t in args.temperatures):
        fail(f"--temperatures must be positive numbers, got {' '.join(f'{t:g}' for t in args.temperatures)}")
    if args.workers < 1:
        fail(f"--workers must be positive, got {args.workers}")
    # The report reads phase 1, the evaluations along phase 2 and their games: none may be empty.
    for name in ("teacher_steps", "offline_steps", "offline_eval_frequency", "eval_episodes"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not os.path.isfile(os.path.join(args.root, SCRIPT)):
        fail(f"--root {args.root}: no {SCRIPT} in it")
    args.variants = variants(args.temperatures)
    return args


def variants(temperatures):
    """{exp name: (label, flags)}: a QDagger student per temperature, then the TD-only student. The
    temperature is always on the command line, so that a log's command says which student it ran."""
    out = {
        f"qdagger_temperature_{t:g}": (
            f"QDagger student (TD + distillation, τ = {t:g})",
            ["--distillation", "--temperature", f"{t:g}"],
        )
        for t in temperatures
    }
    out["td_only"] = ("TD-only student (`--no-distillation`)", ["--no-distillation"])
    return out


def teacher_path(args):
    """The teacher as the students' commands name it: they run from --root, so relative to it when it is there."""
    path = os.path.abspath(args.teacher)
    relative = os.path.relpath(path, args.root)
    return path if relative.startswith("..") else relative


def job(args, seed, name):
    """The run.py job of one student: its command, log and markers under benchmark/logs/qdagger_reincarnation/."""
    flags = [
        "--teacher-model-path",
        teacher_path(args),
        "--teacher-steps",
        str(args.teacher_steps),
        "--offline-steps",
        str(args.offline_steps),
        "--offline-eval-frequency",
        str(args.offline_eval_frequency),
        "--eval-episodes",
        str(args.eval_episodes),
        "--teacher-eval-episodes",
        str(args.eval_episodes),
        "--total-timesteps",
        "0",
        "--save-model",
        *args.variants[name][1],
    ]
    spec = argparse.Namespace(benchmark=NAME, root=args.root, script=SCRIPT, exp_name=name, num_seeds=1, extra=flags)
    return Job(spec, args.env_id, seed)


def run_students(args):
    """Every student of every seed, `--workers` at a time, through run.py: {(seed, name): run folder}. A
    student that finished with the same command is not run again, and one stopped with its checkpoint
    (Ctrl-C) continues from it; a student's markers from another command (other flags) are dropped."""
    jobs = {(seed, name): job(args, seed, name) for seed in args.seeds for name in args.variants}
    todo = []
    for (seed, name), student in jobs.items():
        if logged_command(student.log) != student.command():
            for marker in (student.done, student.resume):
                if os.path.exists(marker):
                    os.remove(marker)
        if student.finished() and os.path.isdir(os.path.join(args.root, read_marker(student.done))):
            print(f"seed {seed}, {name}: finished before, in {read_marker(student.done)}")
        else:
            todo.append(student)
    results = run_all(todo, args.root, args.workers)
    if results is None:
        sys.exit(130)
    failed = [student for student, (ok, _) in zip(todo, results) if not ok]
    # A student that stopped on bad input (flags the script does not accept) says why in its log's `error:` line.
    reasons = [(student, reason) for student in failed if (reason := last_error_line(student.log))]
    if reasons:
        student, reason = reasons[0]
        fail(
            f"{len(failed)} of {len(todo)} students did not finish; seed {student.seed}, {student.exp_name} stopped with: "
            f"{reason} (see {os.path.relpath(student.log)})"
        )
    if failed:
        fail(
            f"{len(failed)} of {len(todo)} students did not finish (see {os.path.relpath(failed[0].log)}); run the same "
            "command again to continue them"
        )
    return {key: os.path.join(args.root, read_marker(student.done)) for key, student in jobs.items()}


def last_error_line(log):
    """The message of the last `error: ...` line of a student's log, or None."""
    if not os.path.exists(log):
        return None
    with open(log, encoding="utf-8", errors="replace") as f:
        messages = [line[len("error: ") :].strip() for line in f if line.startswith("error: ")]
    return messages[-1] if messages else None


def read_student(run_dir, offline_steps):
    """The scalars of phases 1 and 2 (the run's teacher/ and offline/ folders) and their wall time together."""
    scalars, wall = {}, 0.0
    for phase in ("teacher", "offline"):
        if os.path.isdir(os.path.join(run_dir, phase)):
            phase_scalars, phase_wall = read_run(os.path.join(run_dir, phase))
            scalars.update(phase_scalars)
            wall += phase_wall
    for tag in ("charts/teacher/avg_episodic_return", "charts/offline/avg_episodic_return"):
        if tag not in scalars:
            fail(f"{run_dir} has no {tag}: not a finished QDagger phase 2")
    if scalars["charts/offline/avg_episodic_return"][0][-1] != offline_steps:
        fail(f"{run_dir} has no evaluation at the end of phase 2 (step {offline_steps:,}): not a finished phase 2")
    return scalars, wall


def kept_section(path):
    """The `## Checks by hand` section of the page written before (with all that follows it), or []."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(KEPT_SECTION)]
    return lines[starts[0] :] if starts else []


def mean_std(values):
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def report(args, seeds):
    """The page's lines from {seed: {name: (scalars, wall)}}."""
    names = list(args.variants)
    qdagger = names[:-1]  # the QDagger students; the TD-only student is last
    first = names[0]
    teacher = {s: float(seeds[s][first][0]["charts/teacher/avg_episodic_return"][1][0]) for s in seeds}
    curves = {s: {n: seeds[s][n][0]["charts/offline/avg_episodic_return"] for n in names} for s in seeds}
    finals = {n: [float(curves[s][n][1][-1]) for s in seeds] for n in names}
    same_data = {
        s: all(
            np.array_equal(
                seeds[s][n][0]["charts/teacher/episodic_return"][i], seeds[s][first][0]["charts/teacher/episodic_return"][i]
            )
            for n in names
            for i in (0, 1)
        )
        for s in seeds
    }
    steps = curves[args.seeds[0]][first][0]
    if any(not np.array_equal(curves[s][n][0], steps) for s in seeds for n in names):
        fail("the students evaluated at different gradient steps: not one benchmark")
    several = len(seeds) > 1
    teacher_mean = np.mean(list(teacher.values()))
    lines = [
        "# QDagger: a student reincarnated from a PQN teacher, with and without distillation",
        "",
        f"`{args.env_id}`, seed{'s' if several else ''} {', '.join(map(str, seeds))}. Phase 1: the teacher plays "
        f"{args.teacher_steps:,} env steps (epsilon-greedy, epsilon from 1.0 to 0.01 over all of them) into the teacher "
        f"buffer; phase 2: the IMPALA student takes {args.offline_steps:,} gradient steps (batch 32) on that buffer. "
        f"Greedy scores are whole games (all lives, unclipped), {args.eval_episodes} games each. The students of a "
        "seed learn from the same teacher games (checked: the teacher's phase-1 game scores are identical in all their runs).",
        "",
        "## At the end of phase 2",
        "",
        "| seed | teacher (before phase 1) | " + " | ".join(args.variants[n][0] for n in names) + " | same teacher games |",
        "|---|---|" + "---|" * len(names) + "---|",
        *(
            f"| {s} | {teacher[s]:.1f} | "
            + " | ".join(f"{finals[n][i]:.1f}" for n in names)
            + f" | {'yes' if same_data[s] else 'NO'} |"
            for i, s in enumerate(seeds)
        ),
    ]
    if several:
        lines.append(
            f"| mean ± std | {mean_std(list(teacher.values()))} | " + " | ".join(mean_std(finals[n]) for n in names) + " | |"
        )
    lines.append("")
    for n in qdagger:
        ahead = sum(q > t for q, t in zip(finals[n], finals["td_only"]))
        lines.append(
            f"The {args.variants[n][0]} ends at {np.mean(finals[n]):.1f}{' on average' if several else ''}, "
            f"{np.mean(finals[n]) / teacher_mean:.0%} of the teacher's {teacher_mean:.1f}, and is ahead of the TD-only "
            f"student in {ahead} of {len(seeds)} seed{'s' if several else ''}."
        )
    lines += [
        f"The TD-only student ends at {np.mean(finals['td_only']):.1f}."
        + (" std: over seeds (numpy's, ddof = 0)." if several else ""),
        "",
        "## Along phase 2" + (" (mean over seeds)" if several else ""),
        "",
        "| greedy score | " + " | ".join(f"step {int(s):,}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
        *(
            f"| {args.variants[n][0]} | "
            + " | ".join(f"{v:.1f}" for v in np.mean([curves[s][n][1] for s in seeds], axis=0))
            + " |"
            for n in names
        ),
        "",
        f"Machine: {args.machine or 'not given'}. {args.workers} student{'s' if args.workers > 1 else ''} at a time, one "
        "thread each. Wall time of phases 1 and 2 (from their logs), per seed, the longest of its students: "
        + ", ".join(f"seed {s} {format_duration(max(seeds[s][n][1] for n in names))}" for s in seeds)
        + ".",
        "",
        "Commands:",
        "",
        "```",
        *(job(args, s, n).command() for s in seeds for n in names),
        "```",
        "",
        f"Made with `{shlex.join(['python', 'benchmark/qdagger_reincarnation.py', *sys.argv[1:]])}`.",
    ]
    return lines, curves, teacher


def plot(args, curves, teacher, path):
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, (n, (label, _)) in enumerate(args.variants.items()):
        for s in curves:
            ax.plot(*curves[s][n], color=f"C{k}", alpha=0.3, linewidth=1)
        steps = curves[next(iter(curves))][n][0]
        mean = np.mean([curves[s][n][1] for s in curves], axis=0)
        ax.plot(steps, mean, color=f"C{k}", marker="o", label=label.replace("`", "").replace(" student", ""))
    ax.axhline(np.mean(list(teacher.values())), color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("offline gradient steps")
    ax.set_ylabel(f"greedy score ({args.eval_episodes} games)")
    seed_list = ", ".join(map(str, curves))
    ax.set_title(f"{args.env_id}: students reincarnated from a PQN teacher\n(mean of seeds {seed_list}; thin: each seed)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    args = parse_args(argv)
    results = os.path.join(args.root, "benchmark", "results")
    for directory in (logs_dir(args.root, NAME), results, os.path.join(args.root, "runs")):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            fail(f"cannot write to {directory}: {e.strerror}")
    run_dirs = run_students(args)
    seeds = {
        seed: {name: read_student(run_dirs[seed, name], args.offline_steps) for name in args.variants} for seed in args.seeds
    }
    md = os.path.join(results, f"{NAME}.md")
    lines, curves, teacher = report(args, seeds)
    kept = kept_section(md)
    if kept:
        lines += ["", *kept]
    with open(md, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, curves, teacher, os.path.join(results, f"{NAME}.png"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C outside the students' runs (which run_all answers): nothing to save
        print("interrupted: run the same command again to run what has not finished", file=sys.stderr)
        sys.exit(130)
