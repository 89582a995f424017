"""Runs with different seeds share no env stream: every env's seed is derived from its run's seed."""

import numpy as np
import pytest
from helpers import error_line, run_script

import pdqn_minatar as pdqn
import pqn
import pqn_atari_envpool as atari
import pqn_atari_envpool_lstm as lstm
import qdagger_dqn_atari_impalacnn as qd


def test_env_seeds_of_runs_1_to_64_are_all_distinct():
    seeds = []
    for run_seed in range(1, 65):
        for stream, num_envs in [("training", 128), ("evaluation", 16), ("teacher evaluation", 16)]:
            seeds += pqn.env_seeds(run_seed, stream, num_envs)
    assert len(seeds) == 64 * 160
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds)  # envpool takes int32 seeds


def test_neighbouring_run_seeds_share_no_env():
    """With `seed + i`, runs 1 and 2 would share 127 of their 128 envs."""
    assert not set(pqn.env_seeds(1, "training", 128)) & set(pqn.env_seeds(2, "training", 128))


def test_env_seeds_are_a_function_of_seed_stream_and_step():
    assert pqn.env_seeds(3, "training", 8) == pqn.env_seeds(3, "training", 8)
    assert pqn.env_seeds(3, "training", 8)[:4] == pqn.env_seeds(3, "training", 4)  # env i's seed does not depend on the count
    resumed = pqn.env_seeds(3, "training", 8, step=4096)
    assert not set(resumed) & set(pqn.env_seeds(3, "training", 8))


def test_every_script_seeds_its_envs_with_the_same_function():
    for module in (pdqn, atari, qd):
        assert module.env_seeds(7, "evaluation", 5, step=9) == pqn.env_seeds(7, "evaluation", 5, step=9)


def test_an_env_plays_the_stream_of_its_seed():
    """The seeds given reach the envs: env i of a vector env plays as a lone env with seed i does."""
    seeds = pqn.env_seeds(1, "training", 3)
    together = pqn.make_envs("CartPole-v1", seeds).reset()[0]
    alone = np.concatenate([pqn.make_envs("CartPole-v1", [s]).reset()[0] for s in seeds])
    np.testing.assert_array_equal(together, alone)
    envs = pdqn.make_envs(pdqn.finalize_args(pdqn.Args(total_timesteps=4096)), 3)
    together = envs.reset(seed=seeds)[0]
    alone = np.concatenate(
        [pdqn.make_envs(pdqn.finalize_args(pdqn.Args(total_timesteps=4096)), 1).reset(seed=[s])[0] for s in seeds]
    )
    np.testing.assert_array_equal(together, alone)


@pytest.mark.parametrize("script", ["pqn.py", "pdqn_minatar.py", "pqn_atari_envpool.py", "qdagger_dqn_atari_impalacnn.py"])
def test_a_negative_seed_is_one_line(tmp_path, script):
    line = error_line(run_script(script, "--seed", "-1", cwd=tmp_path))
    assert line.startswith("error: --seed must be in [0, 2**32 - 1] (") and line.endswith("got -1")


@pytest.mark.parametrize("module", [pqn, atari, lstm, pdqn, qd], ids=lambda m: m.__name__)
def test_seeds_beyond_numpys_range_are_refused(module):
    given = {"teacher_model_path": "teacher.pt"} if module is qd else {}
    module.finalize_args(module.Args(seed=2**32 - 1, **given))  # numpy's largest seed
    with pytest.raises(module.UsageError, match=r"--seed must be in \[0, 2\*\*32 - "):
        module.finalize_args(module.Args(seed=2**32, **given))
    if module is pqn:  # agent k of --num-seeds gets seed --seed + k
        pqn.finalize_args(pqn.Args(seed=2**32 - 4, num_seeds=4))
        with pytest.raises(pqn.UsageError, match="--seed must be in"):
            pqn.finalize_args(pqn.Args(seed=2**32 - 3, num_seeds=4))


@pytest.mark.parametrize("name", ["noop_max", "max_episode_steps", "eval_max_steps"])
@pytest.mark.parametrize("module", [atari, lstm, qd], ids=lambda m: m.__name__)
def test_envpool_settings_it_cannot_take_are_refused(module, name):
    given = {"teacher_model_path": "teacher.pt"} if module is qd else {}
    module.finalize_args(module.Args(**{name: 2**31 - 1}, **given))
    with pytest.raises(module.UsageError, match=f"--{name.replace('_', '-')} must be below 2\\*\\*31"):
        module.finalize_args(module.Args(**{name: 2**31}, **given))
    if name == "noop_max":  # envpool crashes (segmentation fault) at 0
        module.finalize_args(module.Args(noop_max=1, **given))
        with pytest.raises(module.UsageError, match="--noop-max must be at least 1"):
            module.finalize_args(module.Args(noop_max=0, **given))
