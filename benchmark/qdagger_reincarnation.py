"""Does a student reincarnated from a teacher get good fast? QDagger's offline phase with and without distillation.

    python benchmark/qdagger_reincarnation.py --teacher runs/<run>/pqn_atari_envpool.pt --seeds 1 2 3

For each seed, runs qdagger_dqn_atari_impalacnn.py twice, side by side, with that seed (so the same
teacher games fill the same teacher buffer in phase 1) and `--total-timesteps 0` (the run ends after
phase 2): once as QDagger (TD + distillation) and once with `--no-distillation` (TD alone), each for
`--offline-steps` gradient steps on `--teacher-steps` teacher transitions. The seeds run one after
another. Run again, it skips the runs that finished with the same command (their logs say so and
their run folders are still there), so a stopped benchmark continues where it was.

Writes benchmark/results/qdagger_reincarnation.md: per seed the teacher's greedy score and each
student's at the end of phase 2 (whole games, `--eval-episodes` of them), and whether both students
learned from the same teacher games; over the seeds the mean scores along phase 2; and the
commands. A section `## Checks by hand` of the page written before is kept. And
benchmark/results/qdagger_reincarnation.png: the students' greedy scores against gradient steps,
per seed and their mean, beside the teacher's. Logs go to benchmark/logs/qdagger_reincarnation/.
"""

import argparse
import os
import shlex
import subprocess
import sys

import numpy as np
from report import import_pyplot, read_run
from run import ROOT, fail, format_duration

NAME = "qdagger_reincarnation"
SCRIPT = "qdagger_dqn_atari_impalacnn.py"
VARIANTS = {"qdagger": ["--distillation"], "td_only": ["--no-distillation"]}
LABELS = {"qdagger": "QDagger student (TD + distillation)", "td_only": "TD-only student (`--no-distillation`)"}
KEPT_SECTION = "## Checks by hand"


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="a pqn_atari_envpool.py --save-model file")
    parser.add_argument("--env-id", default="Breakout-v5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one pair of students per seed")
    parser.add_argument("--teacher-steps", type=int, default=50_000)
    parser.add_argument("--offline-steps", type=int, default=5_000)
    parser.add_argument("--offline-eval-frequency", type=int, default=1_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--machine", default="", help="the machine line of the report")
    parser.add_argument("--root", default=ROOT, help="where runs/ and benchmark/ are (the repository root)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.teacher):
        fail(f"no teacher at {args.teacher}")
    if len(set(args.seeds)) != len(args.seeds):
        fail(f"--seeds has repeats: {' '.join(map(str, args.seeds))}")
    return args


def command(args, seed, name):
    """The command of one student, as its log and the report show it (the teacher's path as given)."""
    return [
        "python",
        SCRIPT,
        "--teacher-model-path",
        args.teacher,
        "--env-id",
        args.env_id,
        "--seed",
        str(seed),
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
        *VARIANTS[name],
        "--exp-name",
        name,
    ]


def finished_run(root, log, argv):
    """The run folder of a log whose run finished with this command, or None."""
    if not os.path.exists(log):
        return None
    with open(log, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or lines[0] != f"# command: {shlex.join(argv)}":
        return None
    saved = [line.split()[-1] for line in lines if line.startswith("model saved to ")]
    run_dir = os.path.join(root, os.path.dirname(saved[-1])) if saved else None
    return run_dir if run_dir and os.path.isdir(run_dir) else None


def run_seed(args, seed, logs):
    """Both students of a seed, side by side (those that finished before are not run again): {name: run folder}."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    run_dirs, processes = {}, {}
    for name in VARIANTS:
        argv, log = command(args, seed, name), os.path.join(logs, f"{name}_seed{seed}.log")
        run_dirs[name] = finished_run(args.root, log, argv)
        if run_dirs[name]:
            print(f"seed {seed}, {name}: finished before, in {os.path.relpath(run_dirs[name], args.root)}", flush=True)
            continue
        print(f"seed {seed}, {name}: {shlex.join(argv)}", flush=True)
        with open(log, "w", encoding="utf-8") as f:
            f.write(f"# command: {shlex.join(argv)}\n")
            f.flush()
            real = [sys.executable, argv[1], "--teacher-model-path", os.path.abspath(args.teacher), *argv[4:]]
            processes[name] = subprocess.Popen(real, cwd=args.root, env=env, stdout=f, stderr=subprocess.STDOUT)
    for name, process in processes.items():
        log = os.path.join(logs, f"{name}_seed{seed}.log")
        if process.wait() != 0:
            fail(f"seed {seed}, {name} exited with status {process.returncode}; see {log}")
        run_dirs[name] = finished_run(args.root, log, command(args, seed, name))
        if run_dirs[name] is None:
            fail(f"seed {seed}, {name} finished without saving its model; see {log}")
    return run_dirs


def read_student(run_dir):
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
    teacher = {s: float(seeds[s]["qdagger"][0]["charts/teacher/avg_episodic_return"][1][0]) for s in seeds}
    curves = {s: {n: seeds[s][n][0]["charts/offline/avg_episodic_return"] for n in VARIANTS} for s in seeds}
    finals = {n: [float(curves[s][n][1][-1]) for s in seeds] for n in VARIANTS}
    same_data = {
        s: all(
            np.array_equal(
                seeds[s]["qdagger"][0]["charts/teacher/episodic_return"][i],
                seeds[s]["td_only"][0]["charts/teacher/episodic_return"][i],
            )
            for i in (0, 1)
        )
        for s in seeds
    }
    steps = curves[args.seeds[0]]["qdagger"][0]
    if any(not np.array_equal(curves[s][n][0], steps) for s in seeds for n in VARIANTS):
        fail("the students evaluated at different gradient steps: not one benchmark")
    seed_list = ", ".join(map(str, seeds))
    ahead = sum(q > t for q, t in zip(finals["qdagger"], finals["td_only"]))
    ratio = np.mean(finals["qdagger"]) / np.mean(list(teacher.values()))
    lines = [
        "# QDagger: a student reincarnated from a PQN teacher, with and without distillation",
        "",
        f"`{args.env_id}`, seed{'s' if len(seeds) > 1 else ''} {seed_list}. Phase 1: the teacher plays "
        f"{args.teacher_steps:,} env steps (epsilon-greedy, epsilon from 1.0 to 0.01 over all of them) into the teacher "
        f"buffer; phase 2: the IMPALA student takes {args.offline_steps:,} gradient steps (batch 32) on that buffer. "
        f"Greedy scores are whole games (all lives, unclipped), {args.eval_episodes} games each. The two students of a "
        "seed learn from the same teacher games (checked: the teacher's phase-1 game scores are identical in both runs).",
        "",
        "## At the end of phase 2",
        "",
        "| seed | teacher (before phase 1) | " + " | ".join(LABELS.values()) + " | same teacher games |",
        "|---|---|---|---|---|",
        *(
            f"| {s} | {teacher[s]:.1f} | {finals['qdagger'][i]:.1f} | {finals['td_only'][i]:.1f} | "
            f"{'yes' if same_data[s] else 'NO'} |"
            for i, s in enumerate(seeds)
        ),
    ]
    if len(seeds) > 1:
        lines.append(
            f"| mean ± std | {mean_std(list(teacher.values()))} | {mean_std(finals['qdagger'])} | "
            f"{mean_std(finals['td_only'])} | |"
        )
    lines += [
        "",
        f"The QDagger student ends at {np.mean(finals['qdagger']):.1f}{' on average' if len(seeds) > 1 else ''}, "
        f"{ratio:.0%} of the teacher's {np.mean(list(teacher.values())):.1f}; the TD-only student at "
        f"{np.mean(finals['td_only']):.1f}. The QDagger student is ahead in {ahead} of {len(seeds)} "
        f"seed{'s' if len(seeds) > 1 else ''}. std: over seeds (numpy's, ddof = 0).",
        "",
        "## Along phase 2" + (" (mean over seeds)" if len(seeds) > 1 else ""),
        "",
        "| greedy score | " + " | ".join(f"step {int(s):,}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
        *(
            f"| {LABELS[n]} | " + " | ".join(f"{v:.1f}" for v in np.mean([curves[s][n][1] for s in seeds], axis=0)) + " |"
            for n in VARIANTS
        ),
        "",
        f"Machine: {args.machine or 'not given'}. The two students of a seed side by side, one thread each; the seeds one "
        "after another. Wall time of phases 1 and 2 (from their logs), per seed, the longer of the two students: "
        + ", ".join(f"seed {s} {format_duration(max(seeds[s][n][1] for n in VARIANTS))}" for s in seeds)
        + ".",
        "",
        "Commands:",
        "",
        "```",
        *(shlex.join(command(args, s, n)) for s in seeds for n in VARIANTS),
        "```",
        "",
        f"Made with `{shlex.join(['python', 'benchmark/qdagger_reincarnation.py', *sys.argv[1:]])}`.",
    ]
    return lines, curves, teacher


def plot(args, curves, teacher, path):
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for n, color, label in [("qdagger", "C0", "QDagger (TD + distillation)"), ("td_only", "C1", "TD only")]:
        for s in curves:
            ax.plot(*curves[s][n], color=color, alpha=0.3, linewidth=1)
        steps = curves[next(iter(curves))][n][0]
        ax.plot(steps, np.mean([curves[s][n][1] for s in curves], axis=0), color=color, marker="o", label=label)
    ax.axhline(np.mean(list(teacher.values())), color="gray", linestyle="--", label="teacher")
    ax.set_xlabel("offline gradient steps")
    ax.set_ylabel(f"greedy score ({args.eval_episodes} games)")
    seed_list = ", ".join(map(str, curves))
    ax.set_title(f"{args.env_id}: students reincarnated from a PQN teacher\n(mean of seeds {seed_list}; thin: each seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    args = parse_args(argv)
    logs = os.path.join(args.root, "benchmark", "logs", NAME)
    results = os.path.join(args.root, "benchmark", "results")
    for directory in (logs, results, os.path.join(args.root, "runs")):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            fail(f"cannot write to {directory}: {e.strerror}")
    seeds = {}
    for seed in args.seeds:
        run_dirs = run_seed(args, seed, logs)
        seeds[seed] = {name: read_student(run_dirs[name]) for name in VARIANTS}
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
    main(sys.argv[1:])
