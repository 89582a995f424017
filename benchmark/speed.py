"""Throughput of the Atari PQN scripts with and without the fast path, beside envpool's own rate.

    python benchmark/speed.py                                    # Breakout, 128 envs, 50k steps each
    python benchmark/speed.py --num-envs 8 128 --total-timesteps 500000 > speed.md

For each number of envs: envpool alone with random actions in the same game (benchmark/envpool_random_sps.py,
4 stacked frames and 1 frame), then each script with each set of flags, one run at a time. Prints a
markdown table: the script's final `SPS` (start-up and compilation included) and its steady rate
over the last quarter of the run, from the time its progress lines appear. The `--cudagraphs`
variants run only where CUDA is available. Extra flags after `--` go to every script run.
"""

import argparse
import math
import os
import re
import subprocess
import sys
import time

# run.py is in this directory, which Python puts first on sys.path when it runs this file.
from run import Parser, fail

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["pqn_atari_envpool.py", "pqn_atari_envpool_lstm.py"]
PROGRESS = re.compile(r"step\s+([\d,]+)/([\d,]+) .*SPS\s+([\d,]+)")


def timed_progress(command):
    """Runs `command`; returns [(seconds since start, step, total, SPS)] of its progress lines."""
    start = time.time()
    points = []
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        output = []
        for line in process.stdout:
            output.append(line)
            if m := PROGRESS.search(line):
                points.append((time.time() - start, *(int(g.replace(",", "")) for g in m.groups())))
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {process.returncode}):\n{''.join(output[-5:])}")
    return points


def steady_sps(points):
    """Env steps per second between the first progress line at 3/4 of the run or later and the last."""
    t_end, step_end, total, _ = points[-1]
    t_start, step_start, _, _ = next(p for p in points if 4 * p[1] >= 3 * total)
    return (step_end - step_start) / (t_end - t_start) if t_end > t_start else float("nan")


def envpool_sps(env_id, num_envs, stack_num):
    command = [sys.executable, "benchmark/envpool_random_sps.py", "--env-id", env_id, "--num-envs", str(num_envs)]
    command += ["--stack-num", str(stack_num)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).splitlines(keepends=True)
        sys.exit(f"error: {' '.join(command)} failed (exit {result.returncode}):\n{''.join(output[-5:])}")
    return float(re.search(r"([\d,.]+) env steps/s", result.stdout).group(1).replace(",", ""))


def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Breakout-v5")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[128])
    parser.add_argument("--total-timesteps", type=int, default=50_000, help="env steps of each script run")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    parser.add_argument("extra", nargs="*", help="flags for every script run, after --")
    args = parser.parse_args()
    if min(args.num_envs) < 1:
        fail(f"--num-envs must be positive, got {' '.join(map(str, args.num_envs))}")
    if args.total_timesteps < 1:
        fail(f"--total-timesteps must be positive, got {args.total_timesteps}")
    import envpool  # here, so that --help works without them
    import torch

    # As the scripts check it, but before envpool alone is timed with it.
    if args.env_id not in envpool.list_all_envs() or type(envpool.make_spec(args.env_id)).__name__ != "AtariEnvSpec":
        fail(f"--env-id {args.env_id!r}: not an envpool Atari id (they look like 'Breakout-v5')")

    variants = [[], ["--compile"]]
    if torch.cuda.is_available():
        variants += [["--cudagraphs"], ["--compile", "--cudagraphs"]]
    print(
        f"{args.env_id}, {args.total_timesteps:,} env steps per run, {os.cpu_count()} cores, "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n"
    )
    print("| num envs | what | SPS | steady |\n|---|---|---|---|", flush=True)
    for num_envs in args.num_envs:
        for stack_num in [4, 1]:
            print(
                f"| {num_envs} | envpool alone, random actions, {stack_num} frame(s) | "
                f"{envpool_sps(args.env_id, num_envs, stack_num):,.0f} | |",
                flush=True,
            )
        for script in args.scripts:
            for flags in variants:
                # The LSTM splits its envs into the minibatches (32 by default), so fewer envs need fewer.
                sizes = ["--num-minibatches", str(math.gcd(num_envs, 32))] if "lstm" in script and num_envs % 32 else []
                command = [
                    sys.executable,
                    script,
                    "--env-id",
                    args.env_id,
                    "--num-envs",
                    str(num_envs),
                    "--total-timesteps",
                    str(args.total_timesteps),
                    "--eval-episodes",
                    "2",
                    "--eval-max-steps",
                    "200",
                    *sizes,
                    *flags,
                    *args.extra,
                ]
                points = timed_progress(command)
                what = " ".join([script, *sizes, *flags, *args.extra])
                print(f"| {num_envs} | `{what}` | {points[-1][3]:,} | {steady_sps(points):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
