"""Time of one step of a vector of classic-control envs, random actions, 4 and 32 envs: gymnasium's
`make_vec` against envpool (which pqn.py steps).

    python benchmark/classic_env_steps.py
"""

import time
import warnings

import envpool
import gymnasium as gym
import numpy as np

warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


def microseconds_per_step(envs, num_envs, repeat=300):
    rng = np.random.default_rng(0)
    actions = [rng.integers(envs.single_action_space.n, size=num_envs) for _ in range(repeat)]
    envs.reset()
    best = float("inf")
    for _ in range(3):  # the best of three: this VM's speed drifts
        start = time.perf_counter()
        for a in actions:
            envs.step(a)
        best = min(best, (time.perf_counter() - start) / repeat * 1e6)
    envs.close()
    return best


if __name__ == "__main__":
    print("| env | envs | gymnasium `make_vec` | envpool |")
    print("|---|---|---|---|")
    for env_id in ["CartPole-v1", "Acrobot-v1", "MountainCar-v0"]:
        for num_envs in [4, 32]:
            gym_envs = gym.make_vec(env_id, num_envs=num_envs)
            kind = type(gym_envs).__name__
            gym_us = microseconds_per_step(gym_envs, num_envs)
            pool = envpool.make_gymnasium(env_id, num_envs=num_envs, seed=0, num_threads=1)  # as pqn.py makes them
            pool_us = microseconds_per_step(pool, num_envs)
            print(f"| {env_id} | {num_envs} | {gym_us:,.0f} µs ({kind}) | {pool_us:,.0f} µs |")
