"""pqn.py run as a user runs it: logged metrics, saving and evaluating a model, determinism, bad input."""

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import error_line, only_run_dir, read_scalars, read_text, run_script

import pqn

TINY = "--num-envs 8 --num-steps 32 --num-minibatches 4 --update-epochs 2 --eval-episodes 3 --no-cuda".split()

CONVENTION_SCALARS = {
    "charts/episodic_return",
    "charts/episodic_length",
    "eval/episodic_return",
    "charts/SPS",
    "charts/learning_rate",
    "charts/epsilon",
    "losses/td_loss",
    "losses/q_values",
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("run")
    result = run_script("pqn.py", *TINY, "--total-timesteps", "5120", "--eval-frequency", "2048", "--save-model", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_tiny_run_logs_the_convention_scalars(saved_run):
    cwd, _ = saved_run
    run_dir = only_run_dir(cwd)
    assert os.path.basename(run_dir).startswith("CartPole-v1__pqn__1__")
    scalars = read_scalars(run_dir)
    assert CONVENTION_SCALARS <= set(scalars)
    iterations = 5120 // (8 * 32)
    assert [s for s, _ in scalars["losses/td_loss"]] == [256 * i for i in range(1, iterations + 1)]
    # Evaluations at 2048 and 4096 steps, and at the end.
    assert [s for s, _ in scalars["eval/episodic_return"]] == [2048, 4096, 5120]
    # Learning rate annealed linearly from 2.5e-4 (logged after each iteration's update).
    lrs = [v for _, v in scalars["charts/learning_rate"]]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[-1] == pytest.approx(2.5e-4 / iterations, rel=1e-4)
    eps = [v for _, v in scalars["charts/epsilon"]]
    assert eps[0] == 1.0 and all(a >= b for a, b in zip(eps, eps[1:]))
    # CartPole gives reward 1 per step: a return equals its length.
    returns = [v for _, v in scalars["charts/episodic_return"]]
    lengths = [v for _, v in scalars["charts/episodic_length"]]
    assert len(returns) > 10 and returns == lengths
    assert "|q_lambda|0.65|" in read_text(run_dir, "hyperparameters")


def test_progress_is_a_few_lines_when_not_a_terminal(saved_run):
    _, result = saved_run
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert 1 <= len(progress) <= 11 and "\r" not in result.stdout
    assert progress[-1].startswith("step      5,120/5,120 (100.0%)")


def test_saved_model_loads_and_evaluates_without_training(saved_run):
    cwd, _ = saved_run
    path = os.path.join(only_run_dir(cwd), "pqn.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["args"]["env_id"] == "CartPole-v1" and checkpoint["args"]["num_envs"] == 8
    q_network = pqn.QNetwork(gym.make("CartPole-v1").observation_space, 2, pqn.agent_generators([0]))
    q_network.load_state_dict(checkpoint["q_network"])
    result = run_script("pqn.py", "--eval-checkpoint", path, "--eval-episodes", "4", "--no-cuda", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "CartPole-v1: greedy return over 4 episodes" in result.stdout
    assert len(os.listdir(os.path.join(cwd, "runs"))) == 1  # evaluation does not start a run


def test_same_seed_gives_the_same_losses(tmp_path):
    losses = []
    for name in ["a", "b"]:
        cwd = tmp_path / name
        cwd.mkdir()
        result = run_script("pqn.py", *TINY, "--total-timesteps", "1024", "--seed", "7", cwd=cwd)
        assert result.returncode == 0, result.stderr
        losses.append([v for _, v in read_scalars(only_run_dir(cwd))["losses/td_loss"]])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--env-id", "Pendulum-v1"], "PQN needs a Discrete one"),
        (["--num-minibatches", "3"], "not divisible by --num-minibatches 3"),
        (["--total-timesteps", "100"], "smaller than one batch"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--start-e", "0.1", "--end-e", "0.5"], "--end-e 0.5 is above --start-e 0.1: epsilon decays"),
        (["--q-lambda", "-0.1"], "--q-lambda must be in [0, 1]"),
        (["--num-envs", "0"], "--num-envs must be positive"),
        (["--num-steps", "-4"], "--num-steps must be positive"),
        (["--update-epochs", "0"], "--update-epochs must be positive"),
        (["--eval-checkpoint", "missing.pt"], "no checkpoint at missing.pt"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    result = run_script("pqn.py", *TINY, *flags, cwd=tmp_path)
    line = error_line(result)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_mismatched_or_foreign_checkpoint_gives_one_clear_line(tmp_path):
    acrobot_args = {"env_id": "Acrobot-v1"}
    cartpole_net = pqn.QNetwork(gym.make("CartPole-v1").observation_space, 2, pqn.agent_generators([0]))
    torch.save({"q_network": cartpole_net.state_dict(), "args": acrobot_args}, tmp_path / "cartpole_net.pt")
    line = error_line(run_script("pqn.py", "--eval-checkpoint", "cartpole_net.pt", "--no-cuda", cwd=tmp_path))
    assert "does not fit the Q-network for Acrobot-v1" in line
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    line = error_line(run_script("pqn.py", "--eval-checkpoint", "junk.pt", "--no-cuda", cwd=tmp_path))
    assert "junk.pt is not a pqn.py checkpoint" in line


def test_crossed_is_due_once_per_multiple_whatever_the_batches():
    # Against the obvious reference: some multiple of `every` lies in (step - taken, step].
    rng = np.random.default_rng(0)
    for every in (1, 3, 7, 100):
        step = 0
        for taken in map(int, rng.integers(1, 250, size=200)):
            step += taken
            assert pqn.crossed(step, taken, every) == any(m % every == 0 for m in range(step - taken + 1, step + 1))
