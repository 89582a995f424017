"""Aggregate throughput of pqn.py --num-seeds S: env steps of all agents per second, plain and --compile.

    python benchmark/num_seeds_speed.py                                  # CartPole-v1, S = 1 8 32 128, 500k steps per agent
    python benchmark/num_seeds_speed.py --num-seeds 1 32 --total-timesteps 100000

Runs `pqn.py --env-id ENV --num-seeds S --total-timesteps T [--compile]` one at a time, in a fresh
directory under runs/ (deleted afterwards) so that nothing of the benchmark's runs is touched, and
prints a markdown table: the run's wall time (start-up, compilation and the final evaluation
included), its aggregate SPS (the progress line's SPS at the end of training: env steps of all
agents over the training time) and that SPS over the one of S = 1 with the same flags. As
benchmark/run.py, it runs the commands with OMP_NUM_THREADS=1 unless that is set: run it with nothing
else running, since a run whose threads compete with another process for the cores slows down many times.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRESS = re.compile(r"step\s+([\d,]+)/([\d,]+) .*SPS\s+([\d,]+)")


def run(command):
    """Runs `command` in a scratch directory; returns (wall seconds, SPS of its last progress line)."""
    scratch = tempfile.mkdtemp(
        prefix="num_seeds_speed_", dir=os.path.join(ROOT, "runs") if os.path.isdir(os.path.join(ROOT, "runs")) else None
    )
    try:
        start = time.time()
        result = subprocess.run(command, cwd=scratch, capture_output=True, text=True)  # OMP_NUM_THREADS set by main
        wall = time.time() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    sps = [int(m.group(3).replace(",", "")) for m in PROGRESS.finditer(result.stdout)]
    if not sps:
        sys.exit(f"error: {' '.join(command)} printed no progress line")
    return wall, sps[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--num-seeds", type=int, nargs="+", default=[1, 8, 32, 128], metavar="S")
    parser.add_argument("--total-timesteps", type=int, default=500_000, help="env steps of each agent")
    parser.add_argument("--variants", nargs="+", default=["plain", "compile"], choices=["plain", "compile"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch  # here, so that --help works without it; after OMP_NUM_THREADS, which it reads

    print(
        f"{args.env_id}, {args.total_timesteps:,} env steps per agent, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}\n"
    )
    print("| flags | num seeds | wall time | aggregate SPS | × S = 1 |\n|---|---|---|---|---|", flush=True)
    for variant in args.variants:
        base = None
        for num_seeds in args.num_seeds:
            flags = ["--compile"] if variant == "compile" else []
            command = [
                sys.executable,
                os.path.join(ROOT, "pqn.py"),
                "--env-id",
                args.env_id,
                "--num-seeds",
                str(num_seeds),
                "--total-timesteps",
                str(args.total_timesteps),
                *flags,
            ]
            wall, sps = run(command)
            base = sps if num_seeds == 1 else base
            ratio = f"{sps / base:.1f}" if base else "—"
            print(f"| {' '.join(flags) or '(plain)'} | {num_seeds} | {wall:,.0f} s | {sps:,} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
