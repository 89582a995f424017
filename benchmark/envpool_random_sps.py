"""envpool's own throughput with random actions: the ceiling for pqn_atari_envpool*.py on the same machine.

Uses the training envs' settings (84x84 grayscale, frame skip 4, episodic life, reward clip) with
`--stack-num` frames (4 for pqn_atari_envpool.py, 1 for the LSTM version).
"""

import time
from dataclasses import dataclass

import envpool
import numpy as np
import tyro


@dataclass
class Args:
    env_id: str = "Breakout-v5"
    """the envpool Atari id"""
    num_envs: int = 128
    """the number of parallel envs"""
    stack_num: int = 4
    """the number of stacked frames"""
    num_threads: int = 0
    """envpool worker threads (0: one per core)"""
    steps: int = 400
    """vector steps to time (each steps every env once)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    envs = envpool.make(
        args.env_id,
        env_type="gymnasium",
        num_envs=args.num_envs,
        num_threads=args.num_threads,
        seed=0,
        stack_num=args.stack_num,
        episodic_life=True,
        reward_clip=True,
    )
    envs.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(envs.action_space.n, size=(args.steps, args.num_envs))
    for a in actions[:20]:  # warm-up
        envs.step(a)
    start = time.perf_counter()
    for a in actions:
        envs.step(a)
    elapsed = time.perf_counter() - start
    print(
        f"{args.env_id}: {args.num_envs} envs, {args.steps * args.num_envs / elapsed:,.0f} env steps/s (random "
        f"actions, {elapsed:.1f} s)"
    )
