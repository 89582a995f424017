"""Turns the finished runs of a benchmark into a results table and learning curves.

    python benchmark/report.py --benchmark pqn_classic_control --machine "2-core CPU, no GPU" \\
        --command "bash benchmark/pqn.sh classic"

The runs are the ones benchmark/run.py finished for that benchmark: each
benchmark/logs/<benchmark>/*.done marker names a run directory under runs/, so other runs in runs/
do not count. Their TensorBoard event files are read with TensorBoard's EventAccumulator, the runs
are grouped by (env, exp name = variant), and two files are written:

  benchmark/results/<benchmark>.md   per env and variant: seeds, final behaviour and greedy
                                     return (IQM over seeds with a 95% stratified bootstrap
                                     confidence interval, and mean ± std), wall time, SPS; over
                                     the games of one suite (MinAtar, Atari), the IQM of
                                     normalised scores; with the definitions, the machine and
                                     the commands
  benchmark/results/<benchmark>.png  learning curves, one panel per env, one line per variant
                                     (needs matplotlib: pip install -r requirements/plot.txt)
"""

import argparse
import glob
import math
import os
import re
import shlex
import sys
import warnings

import numpy as np

# run.py is in this directory, which Python puts first on sys.path when it runs this file.
from run import (
    ROOT,
    Parser,
    check_benchmark_name,
    check_writable,
    fail,
    format_duration,
    logged_command,
    logs_dir,
    read_marker,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAIL = 0.1  # the behaviour return of a run: its episodes in this last fraction of its env steps
BINS = 50  # the learning curves: equal-width bins of env steps
BOOTSTRAP_REPS = 2000  # resamples of the stratified bootstrap
# Per-game random and human scores of the Atari-57 table (as used by DQN Zoo and rliable), for human-normalised scores.
ATARI_RANDOM_HUMAN = {
    "Asterix": (210.0, 8503.3),
    "BeamRider": (363.9, 16926.5),
    "Breakout": (1.7, 30.5),
    "Enduro": (0.0, 860.5),
    "Freeway": (0.0, 29.6),
    "MsPacman": (307.3, 6951.6),
    "Pong": (-20.7, 14.6),
    "Qbert": (163.9, 13455.0),
    "Seaquest": (68.4, 42054.7),
    "SpaceInvaders": (148.0, 1668.7),
}
# Tags logged against env steps (the README's Logged metrics): the largest step among them is the run's length.
ENV_STEP_TAGS = ("charts/SPS", "charts/episodic_return", "eval/episodic_return")


def finished_runs(root, benchmark):
    """One dict per .done marker: exp, env_id, seed, run_dir, and the command from the run's log."""
    runs = []
    for done in sorted(glob.glob(os.path.join(glob.escape(logs_dir(root, benchmark)), "*.done"))):
        stem = os.path.basename(done)[: -len(".done")]
        exp, env_name, seed = stem.split("__")[0], "__".join(stem.split("__")[1:-1]), stem.split("__")[-1]
        run_dir = os.path.join(root, read_marker(done))
        if not os.path.isdir(run_dir):
            print(f"warning: {done} names {run_dir}, which does not exist; left out", file=sys.stderr)
            continue
        # The log's first line is `# command: ...`; it also gives the env id with its `/` (MinAtar/...).
        command, env_id = logged_command(done[: -len(".done")] + ".log"), env_name
        argv = shlex.split(command) if command else []
        if "--env-id" in argv[:-1]:
            env_id = argv[argv.index("--env-id") + 1]
        runs.append(dict(exp=exp, env_id=env_id, seed=int(seed) if seed.isdigit() else seed, run_dir=run_dir, command=command))
    return runs


def read_run(run_dir):
    """The scalars of a run, {tag: (steps, values)}, and its wall time from the first to the last event."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    acc.Reload()
    scalars, wall_times = {}, []
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        scalars[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events], dtype=float))
        wall_times += [e.wall_time for e in events]
    for tag in acc.Tags()["tensors"]:  # the hyperparameters text, written when the run starts
        wall_times += [e.wall_time for e in acc.Tensors(tag)]
    return scalars, (max(wall_times) - min(wall_times)) if wall_times else math.nan


def summarize(run):
    """Adds to a run the numbers of the table: env steps, behaviour and greedy return, SPS, wall time."""
    scalars, run["wall_time"] = read_run(run["run_dir"])
    run["scalars"] = scalars
    run["steps"] = max((int(scalars[tag][0].max()) for tag in ENV_STEP_TAGS if tag in scalars), default=0)
    steps, returns = scalars.get("charts/episodic_return", (np.array([]), np.array([])))
    tail = returns[steps >= (1 - TAIL) * run["steps"]]
    run["behaviour"] = tail.mean() if len(tail) else (returns[-1] if len(returns) else math.nan)
    run["greedy"] = scalars["eval/episodic_return"][1][-1] if "eval/episodic_return" in scalars else math.nan
    run["sps"] = scalars["charts/SPS"][1][-1] if "charts/SPS" in scalars else math.nan
    return run


def iqm(scores):
    """Interquartile mean: the mean of the scores left when floor(n/4) are cut from each end of the
    sorted scores (scipy.stats.trim_mean(scores, 0.25), as rliable computes it)."""
    x = np.sort(np.asarray(scores, dtype=float).ravel())
    cut = len(x) // 4
    return float(x[cut : len(x) - cut].mean())


def stratified_bootstrap_ci(tasks, statistic=iqm, reps=BOOTSTRAP_REPS, level=0.95, seed=0):
    """Percentile confidence interval of `statistic` over all runs of all tasks, when each task's
    runs are resampled with replacement, each task keeping its number of runs (rliable's stratified
    bootstrap). `tasks` is a list of 1-d arrays of scores, one per task (env)."""
    rng = np.random.default_rng(seed)
    tasks = [np.asarray(t, dtype=float) for t in tasks]
    stats = np.empty(reps)
    for r in range(reps):
        stats[r] = statistic(np.concatenate([t[rng.integers(0, len(t), len(t))] for t in tasks]))
    low, high = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high)


def iqm_ci(values):
    """'IQM [low, high]' over seeds, of the values that exist; '—' if none."""
    values = np.array([v for v in values if not math.isnan(v)])
    if not len(values):
        return "—"
    low, high = stratified_bootstrap_ci([values])
    return f"{iqm(values):.1f} [{low:.1f}, {high:.1f}]"


def suite(env_id):
    """The benchmark suite an env belongs to, for normalised aggregates: MinAtar, Atari or None."""
    if env_id.startswith("MinAtar/"):
        return "MinAtar"
    if env_id.endswith("-v5") and env_id[: -len("-v5")] in ATARI_RANDOM_HUMAN:
        return "Atari"
    return None


def aggregate_lines(groups, envs, variants):
    """Per suite with two games or more: per variant, the IQM of normalised scores over all its runs
    with a 95% stratified bootstrap interval (one stratum per game)."""
    lines = []
    for name in ("MinAtar", "Atari"):
        games = [env_id for env_id in envs if suite(env_id) == name]
        if len(games) < 2:
            continue
        lines += ["", f"### {name}: IQM of normalised scores over {len(games)} games", ""]
        if name == "Atari":
            lines += [
                "Human-normalised: (score − random) / (human − random), with the published per-game random and human scores.",
                "",
            ]
        else:
            lines += [
                "MinAtar has no reference scores: each game's scores are divided by the best mean (over seeds) "
                "that a variant reaches on that game in this table, for that metric (1 = the best variant's mean).",
                "",
            ]
        lines += ["| variant | games | behaviour | greedy |", "|---|---|---|---|"]
        for exp in variants:
            cells = []
            for metric in ("behaviour", "greedy"):
                tasks = []
                for env_id in games:
                    runs = groups.get((env_id, exp), [])
                    scores = np.array([run[metric] for run in runs if not math.isnan(run[metric])])
                    if not len(scores):
                        continue
                    if name == "Atari":
                        random_score, human = ATARI_RANDOM_HUMAN[env_id[: -len("-v5")]]
                        tasks.append((scores - random_score) / (human - random_score))
                    else:
                        means = [
                            np.nanmean([run[metric] for run in groups[(env_id, e)]]) for e in variants if (env_id, e) in groups
                        ]
                        best = max(m for m in means if not math.isnan(m))
                        tasks.append(scores / best if best > 0 else np.full(len(scores), np.nan))
                if tasks and not any(np.isnan(t).any() for t in tasks):
                    low, high = stratified_bootstrap_ci(tasks)
                    cells.append(f"{iqm(np.concatenate(tasks)):.2f} [{low:.2f}, {high:.2f}] ({len(tasks)} games)")
                else:
                    cells.append("—")
            lines.append(f"| {exp} | {len(games)} | {cells[0]} | {cells[1]} |")
    return lines


def mean_std(values):
    """'mean ± std' over seeds (population std, ddof=0), of the values that exist; '—' if none."""
    values = np.array([v for v in values if not math.isnan(v)])
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) else "—"


def binned_curve(steps, values, total):
    """Mean episodic return in BINS equal bins of env steps over [0, total]; an empty bin keeps the last value."""
    edges = np.linspace(0, total, BINS + 1)
    index = np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, BINS - 1)
    counts = np.bincount(index, minlength=BINS)
    sums = np.bincount(index, weights=values, minlength=BINS)
    curve = np.full(BINS, np.nan)
    curve[counts > 0] = sums[counts > 0] / counts[counts > 0]
    for i in range(1, BINS):
        if np.isnan(curve[i]):
            curve[i] = curve[i - 1]
    return (edges[:-1] + edges[1:]) / 2, curve


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        fail("the learning curves need matplotlib: pip install -r requirements/plot.txt (or pass --no-plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(groups, envs, variants, title, path):
    """One panel per env: per variant the mean binned curve over seeds with a ±std band, and greedy evaluations."""
    plt = import_pyplot()
    from matplotlib.ticker import EngFormatter

    cols = min(3, len(envs))
    rows = math.ceil(len(envs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(envs) :]:
        ax.set_visible(False)
    for ax, env_id in zip(axes.flat, envs):
        for i, exp in enumerate(variants):
            runs = groups.get((env_id, exp))
            if not runs:
                continue
            color = f"C{i}"
            total = max(run["steps"] for run in runs)
            curves = [
                binned_curve(*run["scalars"]["charts/episodic_return"], total)[1]
                for run in runs
                if "charts/episodic_return" in run["scalars"]
            ]
            if curves and total > 0:
                x = binned_curve(np.array([]), np.array([]), total)[0]
                with warnings.catch_warnings():  # bins before any seed's first episode are all-NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, std = np.nanmean(curves, axis=0), np.nanstd(curves, axis=0)
                ax.plot(x, mean, color=color, label=f"{exp} (behaviour, {len(curves)} seed{'s' if len(curves) > 1 else ''})")
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            evals = {}
            for run in runs:
                if "eval/episodic_return" in run["scalars"]:
                    for step, value in zip(*run["scalars"]["eval/episodic_return"]):
                        evals.setdefault(int(step), []).append(value)
            if evals:
                eval_steps = sorted(evals)
                ax.plot(
                    eval_steps,
                    [np.mean(evals[s]) for s in eval_steps],
                    "o",
                    color=color,
                    markeredgecolor="black",
                    label=f"{exp} (greedy)",
                )
        ax.set_title(env_id)
        ax.set_xlabel("env steps")
        ax.set_ylabel("episodic return")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_ranges(seeds):
    """1, 2, 3, 5 -> "1–3, 5": runs of consecutive integer seeds as ranges."""
    numbers = sorted(seed for seed in seeds if isinstance(seed, int))
    parts, start = [], None
    for i, seed in enumerate(numbers):
        start = seed if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != seed + 1:
            parts.append(str(seed) if seed == start else f"{start}, {seed}" if seed == start + 1 else f"{start}–{seed}")
            start = None
    return ", ".join(parts + [str(seed) for seed in seeds if not isinstance(seed, int)])


def format_steps(step):
    """500736 -> "0.50M", 49152 -> "49k": env steps, short."""
    return f"{step / 1e6:.2f}M" if step >= 100_000 else f"{step / 1e3:.0f}k" if step >= 1000 else str(step)


def run_lines(groups, envs, variants):
    """Every run on its own: its greedy evaluations in order, behaviour return, wall time, SPS and folder."""
    lines = [
        "",
        "<details><summary>Every run</summary>",
        "",
        "| env | variant | seed | greedy evaluations (env steps: return) | behaviour | wall time | SPS | run folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for env_id in envs:
        for exp in variants:
            for run in groups.get((env_id, exp), []):
                steps, values = run["scalars"].get("eval/episodic_return", ((), ()))
                evals = ", ".join(f"{format_steps(int(step))}: {value:.1f}" for step, value in zip(steps, values)) or "—"
                wall = format_duration(run["wall_time"]) if not math.isnan(run["wall_time"]) else "—"
                sps = f"{run['sps']:,.0f}" if not math.isnan(run["sps"]) else "—"
                behaviour = f"{run['behaviour']:.1f}" if not math.isnan(run["behaviour"]) else "—"
                lines.append(
                    f"| {env_id} | {exp} | {run['seed']} | {evals} | {behaviour} | {wall} | {sps} "
                    f"| `{os.path.basename(os.path.normpath(run['run_dir']))}` |"
                )
    return lines + ["", "</details>"]


def markdown(benchmark, groups, envs, variants, machine, made_with, png):
    lines = [f"# Benchmark `{benchmark}`", ""]
    if made_with:
        lines += [f"Made with `{made_with}`.", ""]
    lines += [f"Machine: {machine or 'not given (report.py --machine)'}.", ""]
    lines += [
        "| env | variant | seeds | behaviour IQM [95% CI] | behaviour mean ± std | greedy IQM [95% CI] | greedy mean "
        "± std | wall time | SPS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for env_id in envs:
        for exp in variants:
            runs = groups.get((env_id, exp))
            if runs:
                wall = np.mean([run["wall_time"] for run in runs])
                sps = [run["sps"] for run in runs if not math.isnan(run["sps"])]
                lines.append(
                    f"| {env_id} | {exp} | {len(runs)} | {iqm_ci([run['behaviour'] for run in runs])} "
                    f"| {mean_std([run['behaviour'] for run in runs])} | {iqm_ci([run['greedy'] for run in runs])} "
                    f"| {mean_std([run['greedy'] for run in runs])} | "
                    f"{format_duration(wall) if not math.isnan(wall) else '—'} "
                    f"| {f'{np.mean(sps):,.0f}' if sps else '—'} |"
                )
    lines += [
        "",
        "- **seeds**: the number of finished runs (one per seed); the seeds are in the commands below.",
        "- **behaviour return**: per run, the mean `charts/episodic_return` (ε-greedy behaviour policy) of the "
        f"episodes that ended in the last {TAIL:.0%} of the run's env steps (the last episode's return if none ended "
        "there); then mean ± std over seeds.",
        "- **greedy return**: per run, the last `eval/episodic_return` (greedy policy, evaluated after the last "
        "update); then mean ± std over seeds; — if the runs logged no evaluation.",
        "- **std** is the population standard deviation over seeds (numpy's default, ddof = 0).",
        "- **IQM** is the interquartile mean over seeds: the mean of the runs left when a quarter (rounded down) is "
        "cut from each end; with fewer than 4 seeds it is the mean. **95% CI**: the percentile interval of the IQM "
        f"over {BOOTSTRAP_REPS} bootstrap resamples of the seeds (with replacement); with one seed it is the point itself.",
        "- **wall time**: per run, from the first to the last event of its TensorBoard file; mean over seeds.",
        "- **SPS**: per run, the last `charts/SPS` (env steps per second from the start of training); mean over seeds.",
        "- The env steps of a run are the largest step it logged for `charts/SPS`, `charts/episodic_return` or "
        "`eval/episodic_return`.",
    ]
    if any(run["command"] and "--num-seeds" in shlex.split(run["command"]) for runs in groups.values() for run in runs):
        lines.append(
            "- Runs of a `--num-seeds` command trained together in one process: their wall time is that process's, "
            "and their SPS each agent's own rate (the process stepped the envs of all its agents: that SPS times the "
            "number of agents)."
        )
    lines += run_lines(groups, envs, variants)
    lines += aggregate_lines(groups, envs, variants)
    if png:
        lines += [
            "",
            f"![learning curves]({png})",
            "",
            f"Learning curves: per run, `charts/episodic_return` averaged in {BINS} equal bins of env steps (a bin "
            "without an episode keeps the previous value); the line is the mean over seeds and the band ± one std; "
            "the points are the greedy evaluations (`eval/episodic_return`), mean over seeds.",
        ]
    lines += [
        "",
        "## Commands",
        "",
        "Run from the repository root by `benchmark/run.py` (with `OMP_NUM_THREADS=1` unless set otherwise):",
        "",
    ]
    lines += ["```"]
    for env_id in envs:
        for exp in variants:
            runs = groups.get((env_id, exp), [])
            commands = {}
            for run in runs:
                if run["command"]:
                    # A --num-seeds command trained all its agents (seeds) in one process: shown once, as it ran.
                    one_process = "--num-seeds" in shlex.split(run["command"])
                    command = run["command"] if one_process else re.sub(r"--seed \S+", "--seed S", run["command"], count=1)
                    commands.setdefault(command, []).append(run["seed"])
            for command, seeds in commands.items():
                if "--num-seeds" in shlex.split(command):
                    lines.append(f"{command}    # one process, agents with seeds {seed_ranges(seeds)}")
                else:
                    lines.append(f"{command}    # S = {seed_ranges(seeds)}")
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, help="the --benchmark given to run.py")
    parser.add_argument("--machine", help='the machine the runs ran on, for the report, e.g. "2-core CPU, no GPU"')
    parser.add_argument("--command", help='what made the benchmark, for the report, e.g. "bash benchmark/pqn.sh classic"')
    parser.add_argument("--root", default=ROOT, help="where runs/ and benchmark/ are (default: the repository root)")
    parser.add_argument("--no-plot", action="store_true", help="write only the table (no matplotlib needed)")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    check_benchmark_name(args.benchmark)
    if not args.no_plot:
        import_pyplot()  # fails now, not after reading every run, when matplotlib is missing
    runs = finished_runs(root, args.benchmark)
    if not runs:
        fail(f"benchmark {args.benchmark!r} has no finished runs (no .done files in {logs_dir(root, args.benchmark)})")
    results = os.path.join(root, "benchmark", "results")
    check_writable(results)  # now, not after every run has been read
    groups = {}
    for run in sorted(runs, key=lambda run: str(run["seed"]).zfill(12)):
        groups.setdefault((run["env_id"], run["exp"]), []).append(summarize(run))
    envs = sorted({env_id for env_id, _ in groups})
    variants = sorted({exp for _, exp in groups})
    png = None
    if not args.no_plot:
        png = f"{args.benchmark}.png"
        plot(groups, envs, variants, f"{args.benchmark}: mean ± std over seeds", os.path.join(results, png))
    md = os.path.join(results, f"{args.benchmark}.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(args.benchmark, groups, envs, variants, args.machine, args.command, png))
    print(f"wrote {md}" + (f" and {os.path.join(results, png)}" if png else "") + f" ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
