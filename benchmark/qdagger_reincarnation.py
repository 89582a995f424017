"""Does a student reincarnated from a teacher get good fast? QDagger's offline phase with and without distillation.

    python benchmark/qdagger_reincarnation.py --teacher runs/<run>/pqn_atari_envpool.pt

Runs qdagger_dqn_atari_impalacnn.py twice, side by side, with the same seed (so the same teacher
games fill the same teacher buffer in phase 1) and `--total-timesteps 0` (the run ends after phase
2): once as QDagger (TD + distillation) and once with `--no-distillation` (TD alone), each for
`--offline-steps` gradient steps on `--teacher-steps` teacher transitions. Writes
benchmark/results/qdagger_reincarnation.md: the teacher's greedy score, each student's greedy score
over the course of phase 2 and at its end (whole games, `--eval-episodes` of them), whether the two
teacher buffers came from the same games, and the commands; and
benchmark/results/qdagger_reincarnation.png, the students' greedy scores against gradient steps
beside the teacher's. Logs go to benchmark/logs/qdagger_reincarnation/.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time

import numpy as np
from report import import_pyplot, read_run
from run import ROOT, fail, format_duration

RESULTS = os.path.join(ROOT, "benchmark", "results")
LOGS = os.path.join(ROOT, "benchmark", "logs", "qdagger_reincarnation")
VARIANTS = {"qdagger": ["--distillation"], "td_only": ["--no-distillation"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", required=True, help="a pqn_atari_envpool.py --save-model file")
    parser.add_argument("--env-id", default="Breakout-v5")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--teacher-steps", type=int, default=50_000)
    parser.add_argument("--offline-steps", type=int, default=5_000)
    parser.add_argument("--offline-eval-frequency", type=int, default=1_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--machine", default="", help="the machine line of the report")
    args = parser.parse_args()
    if not os.path.isfile(args.teacher):
        fail(f"no teacher at {args.teacher}")
    os.makedirs(LOGS, exist_ok=True)
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)

    flags = [
        "--teacher-model-path",
        os.path.abspath(args.teacher),
        "--env-id",
        args.env_id,
        "--seed",
        str(args.seed),
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
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    commands, processes, start = {}, {}, time.time()
    for name, variant in VARIANTS.items():
        commands[name] = [sys.executable, "qdagger_dqn_atari_impalacnn.py", *flags, *variant, "--exp-name", name]
        log = open(os.path.join(LOGS, f"{name}.log"), "w")
        log.write(
            f"# command: {shlex.join(['python', *commands[name][1:]]).replace(os.path.abspath(args.teacher), args.teacher)}\n"
        )
        log.flush()
        processes[name] = subprocess.Popen(commands[name], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for name, process in processes.items():
        if process.wait() != 0:
            fail(f"{name} exited with status {process.returncode}; see {os.path.join(LOGS, name + '.log')}")
        with open(os.path.join(LOGS, f"{name}.log")) as log:
            saved = [line.split()[-1] for line in log if line.startswith("model saved to ")]
        run_dir = os.path.join(ROOT, os.path.dirname(saved[-1]))
        # Phases 1 and 2 log to the run's teacher/ and offline/ subdirectories.
        runs[name] = {
            tag: v
            for d in ("teacher", "offline")
            if os.path.isdir(os.path.join(run_dir, d))
            for tag, v in read_run(os.path.join(run_dir, d))[0].items()
        }
    wall = time.time() - start

    teacher_score = float(runs["qdagger"]["charts/teacher/avg_episodic_return"][1][0])
    same_data = all(
        np.array_equal(
            runs["qdagger"]["charts/teacher/episodic_return"][i], runs["td_only"]["charts/teacher/episodic_return"][i]
        )
        for i in (0, 1)
    )
    curves = {name: runs[name]["charts/offline/avg_episodic_return"] for name in VARIANTS}
    finals = {name: float(values[-1]) for name, (_, values) in curves.items()}
    steps = curves["qdagger"][0]

    lines = [
        "# QDagger: a student reincarnated from a PQN teacher, with and without distillation",
        "",
        f"`{args.env_id}`, seed {args.seed}. Phase 1: the teacher plays {args.teacher_steps:,} env steps "
        f"(epsilon-greedy, epsilon from 1.0 to 0.01 over all of them) into the teacher buffer; phase 2: the IMPALA "
        f"student takes {args.offline_steps:,} gradient steps (batch 32) on that buffer. Greedy scores are whole "
        f"games (all lives, unclipped), {args.eval_episodes} games each. Both students learned from the same "
        f"teacher games: {'yes' if same_data else 'NO'} (the teacher's phase-1 game scores are identical in both runs).",
        "",
        "| greedy score | " + " | ".join(f"step {int(s):,}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
        f"| teacher | {teacher_score:.1f} (before phase 1) |" + " |" * (len(steps) - 1),
    ]
    for name, label in [
        ("qdagger", "QDagger student (TD + distillation)"),
        ("td_only", "TD-only student (`--no-distillation`)"),
    ]:
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in curves[name][1]) + " |")
    ratio = finals["qdagger"] / teacher_score if teacher_score > 0 else float("nan")
    lines += [
        "",
        f"At the end of phase 2 the QDagger student scores {finals['qdagger']:.1f}, {ratio:.0%} of the teacher's "
        f"{teacher_score:.1f}; the TD-only student scores {finals['td_only']:.1f}.",
        "",
        f"Machine: {args.machine or 'not given'}. Both runs side by side, one thread each; wall time {format_duration(wall)}.",
        "",
        "Commands:",
        "",
        "```",
        *(
            shlex.join(["python", *command[1:]]).replace(os.path.abspath(args.teacher), args.teacher)
            for command in commands.values()
        ),
        "```",
        "",
        f"Made with `{shlex.join(['python', 'benchmark/qdagger_reincarnation.py', *sys.argv[1:]])}`.",
    ]
    with open(os.path.join(RESULTS, "qdagger_reincarnation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    plt = import_pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, label in [("qdagger", "QDagger (TD + distillation)"), ("td_only", "TD only")]:
            ax.plot(*curves[name], marker="o", label=label)
        ax.axhline(teacher_score, color="gray", linestyle="--", label="teacher")
        ax.set_xlabel("offline gradient steps")
        ax.set_ylabel(f"greedy score ({args.eval_episodes} games)")
        ax.set_title(f"{args.env_id}: student reincarnated from a PQN teacher")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(RESULTS, "qdagger_reincarnation.png"), dpi=100)


if __name__ == "__main__":
    main()
