"""A pqn.py run killed with SIGKILL and resumed, beside the same run uninterrupted (same seed).

    python benchmark/resume_check.py --env-id CartPole-v1 --seed 1 --kill-after 0.55

Runs `python pqn.py --env-id ENV --seed SEED` (plus the flags after `--`) twice, one after the
other: once through, then once killed with SIGKILL (nothing of the run gets to react) after
`--kill-after` of the first run's wall time and continued with `--resume`. Writes
benchmark/results/pqn_resume.md: both runs' behaviour return over their last 10% of env steps
and final greedy return, where the kill fell, the steps the killed run had done after its last
checkpoint (redone by the resumed run: the time since that checkpoint × the killed run's SPS
between its last two checkpoints, rounded to whole iterations), and what a checkpoint write costs
at the default frequency; and
benchmark/results/pqn_resume.png, both learning curves.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from report import TAIL, binned_curve, import_pyplot, read_run
from run import ROOT, Parser, fail

sys.path.insert(0, ROOT)
import pqn  # noqa: E402  (its save_atomically: the time of a checkpoint write)

RESULTS = os.path.join(ROOT, "benchmark", "results")


def start(flags, env):
    """Starts pqn.py with `flags`; returns the process and the run directory it makes."""
    before = set(os.listdir(os.path.join(ROOT, "runs")))
    process = subprocess.Popen([sys.executable, "pqn.py", *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    while not set(os.listdir(os.path.join(ROOT, "runs"))) - before:
        if process.poll() is not None:
            if process.returncode == 2:  # bad input (a flag after --): pqn.py has printed its one `error:` line
                sys.exit(2)
            fail(f"pqn.py {' '.join(flags)} exited with status {process.returncode}")
        time.sleep(0.05)
    (name,) = set(os.listdir(os.path.join(ROOT, "runs"))) - before
    return process, os.path.join(ROOT, "runs", name)


def behaviour_return(scalars, total):
    steps, values = scalars["charts/episodic_return"]
    return float(np.mean(values[steps > (1 - TAIL) * total]))


def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--kill-after",
        type=float,
        default=0.55,
        help="when to kill the second run, as a fraction of the first run's wall time",
    )
    parser.add_argument("flags", nargs="*", help="more flags for both pqn.py runs (after --)")
    args = parser.parse_args()
    if not 0 < args.kill_after < 1:
        fail("--kill-after must be between 0 and 1")
    if not 0 <= args.seed < 2**32:  # pqn.py's range, checked before its first run starts
        fail(f"--seed must be in [0, 2**32 - 1], got {args.seed}")
    flags = ["--env-id", args.env_id, "--seed", str(args.seed), "--no-cuda", *args.flags]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)

    began = time.time()
    process, through = start(flags, env)
    if process.wait() != 0:
        fail(f"pqn.py {' '.join(flags)} exited with status {process.returncode}")
    through_seconds = time.time() - began

    process, killed = start(flags, env)
    checkpoint_path = os.path.join(killed, "checkpoint.pt")
    written = {}  # when each checkpoint appeared: (time, global step); the file is replaced whole each time
    kill_time = time.time() + args.kill_after * through_seconds
    while time.time() < kill_time:
        if process.poll() is not None:
            fail("the second run ended before it was killed: use a smaller --kill-after")
        if os.path.isfile(checkpoint_path) and os.path.getmtime(checkpoint_path) not in written:
            mtime = os.path.getmtime(checkpoint_path)
            written[mtime] = torch.load(checkpoint_path, weights_only=True)["global_step"]
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_seconds = time.time() - began - through_seconds
    if len(written) < 2:
        fail("the run was killed before its second checkpoint: use a larger --kill-after")
    (t0, step0), (t1, step1) = sorted(written.items())[-2:]
    killed_sps = (step1 - step0) / (t1 - t0)
    since_checkpoint = kill_time - t1
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    resumed = subprocess.run(
        [sys.executable, "pqn.py", "--resume", os.path.relpath(killed, ROOT), "--no-cuda"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    if resumed.returncode != 0:
        fail(f"the resumed run exited with status {resumed.returncode}")

    # A checkpoint write, timed on the checkpoint itself (median of 20).
    times = []
    for _ in range(20):
        t = time.perf_counter()
        pqn.save_atomically(checkpoint, os.path.join(killed, "timing.pt"))
        times.append(time.perf_counter() - t)
    os.remove(os.path.join(killed, "timing.pt"))
    write_ms = 1000 * float(np.median(times))

    runs = {"uninterrupted": through, "killed and resumed": killed}
    data = {name: read_run(run_dir)[0] for name, run_dir in runs.items()}
    total = int(data["uninterrupted"]["charts/SPS"][0][-1])
    batch = checkpoint["args"]["num_envs"] * checkpoint["args"]["num_steps"]
    lost = int(round(since_checkpoint * killed_sps / batch)) * batch
    writes = 10  # the default frequency: every tenth of the run, the last at the end

    os.makedirs(RESULTS, exist_ok=True)
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, scalars) in enumerate(data.items()):
        ax.plot(*binned_curve(*scalars["charts/episodic_return"], total), color=f"C{i}", label=f"{name} (behaviour)")
        ax.plot(*scalars["eval/episodic_return"], "o", color=f"C{i}", markeredgecolor="black", label=f"{name} (greedy)")
    ax.axvline(checkpoint["global_step"], color="gray", linestyle="--", label="checkpoint resumed from")
    ax.set_xlabel("env steps")
    ax.set_ylabel("episodic return")
    ax.set_title(f"pqn.py {args.env_id}, seed {args.seed}: killed and resumed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "pqn_resume.png"), dpi=110)
    plt.close(fig)

    command = "python benchmark/resume_check.py " + " ".join(sys.argv[1:])
    lines = [
        "# pqn.py killed with SIGKILL and resumed, beside the same run uninterrupted",
        "",
        f"`{command}`: `pqn.py {' '.join(flags)}`, run once through and once killed after "
        f"{killed_seconds:.0f} s ({args.kill_after:.0%} of the first run's {through_seconds:.0f} s), then continued "
        f"with `--resume`. Behaviour return: mean over the episodes of the last {TAIL:.0%} of env steps; greedy: the "
        "final evaluation.",
        "",
        "| run | env steps | behaviour return | greedy return |",
        "|---|---|---|---|",
    ]
    for name, scalars in data.items():
        steps = int(scalars["charts/SPS"][0][-1])
        lines.append(
            f"| {name} | {steps:,} | {behaviour_return(scalars, total):.1f} | {scalars['eval/episodic_return'][1][-1]:.1f} |"
        )
    lines += [
        "",
        f"The killed run's last checkpoint held step {checkpoint['global_step']:,}; it was written {since_checkpoint:.1f} s "
        f"before the kill, so about {lost:,} env steps ({since_checkpoint:.1f} s × {killed_sps:,.0f} SPS, its rate "
        "between its last "
        f"two checkpoints) were lost and done again. "
        f"A checkpoint write took {write_ms:.1f} ms (median of 20): at the default frequency ({writes} writes a run) "
        f"{writes * write_ms / 1000:.2f} s, {100 * writes * write_ms / 1000 / through_seconds:.2f}% of the "
        f"uninterrupted run's {through_seconds:.0f} s.",
        "",
        "![learning curves](pqn_resume.png)",
        "",
    ]
    with open(os.path.join(RESULTS, "pqn_resume.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
