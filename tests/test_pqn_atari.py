"""pqn_atari_envpool.py: episode boundaries and game scores on real envpool Breakout, logging, saving, bad input."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import error_line, only_run_dir, read_scalars, run_script
from test_pqn_cli import CONVENTION_SCALARS

import pqn_atari_envpool as atari

TINY = ["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--eval-episodes", "2", "--no-cuda"]


def tiny_args(**overrides):
    args = atari.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64, max_episode_steps=150)
    for name, value in overrides.items():
        setattr(args, name, value)
    return atari.finalize_args(args)


class Recorder:
    """Passes steps through to the envs and keeps what each step returned."""

    def __init__(self, envs):
        self.envs = envs
        self.config = envs.config
        self.steps = []

    def reset(self):
        return self.envs.reset()

    def send(self, actions):
        self.envs.send(actions)

    def recv(self):
        out = self.envs.recv()
        self.steps.append(out)
        return out

    def step(self, actions):
        self.send(actions)
        return self.recv()


def run_rollout(env_groups, q_network, epsilon, num_steps):
    obs = np.concatenate([envs.reset()[0] for envs in env_groups])
    policy = lambda obs, epsilon: atari.act(q_network, obs, epsilon)  # noqa: E731
    game_stats = [atari.GameStats(envs.config["num_envs"]) for envs in env_groups]
    staging = torch.empty(obs.shape, dtype=torch.uint8)
    is_reset = np.zeros(len(obs), dtype=bool)
    return atari.rollout(
        env_groups, policy, torch.as_tensor(obs), is_reset, torch.tensor(epsilon), num_steps, game_stats, staging
    )


def random_rollout(num_steps, **overrides):
    args = tiny_args(**overrides)
    envs = Recorder(atari.make_atari_envs(args.env_id, list(range(args.num_envs)), 4, args))
    torch.manual_seed(0)
    q_network = atari.QNetwork(4, envs.envs.action_space.n)
    b, _, _, games = run_rollout([envs], q_network, 1.0, num_steps)
    return b, games, envs.steps


def test_two_env_groups_give_the_rollout_of_one():
    args = tiny_args()
    torch.manual_seed(0)
    q_network = atari.QNetwork(4, 4)
    one = run_rollout([atari.make_atari_envs(args.env_id, [0, 1, 2, 3], 4, args)], q_network, 0.0, 60)
    two = run_rollout(
        [atari.make_atari_envs(args.env_id, [0, 1], 4, args), atari.make_atari_envs(args.env_id, [2, 3], 4, args)],
        q_network,
        0.0,
        60,
    )
    # Frames, actions, rewards and flags exactly (this network's greedy actions win by more than 0.9,
    # far above rounding); Q-values up to rounding: CPU kernels round differently with the batch
    # size, 4 envs against two groups of 2.
    for name in ["obs", "actions", "rewards", "terminations", "truncations", "is_reset"]:
        assert torch.equal(one[0][name], two[0][name]), name
    for name in ["max_q", "next_q"]:
        torch.testing.assert_close(one[0][name], two[0][name], msg=name)
    assert torch.equal(one[1], two[1]) and np.array_equal(one[2], two[2])
    assert sorted(one[3]) == sorted(two[3])


def test_reset_steps_are_exactly_the_steps_after_life_losses_and_game_overs():
    b, _, steps = random_rollout(400)
    lives = np.stack([info["lives"] for *_, info in steps])
    game_over = np.stack([info["terminated"] == 1 for *_, info in steps])
    truncated = np.stack([trunc for _, _, _, trunc, _ in steps])
    elapsed = np.stack([info["elapsed_step"] for *_, info in steps])
    life_lost = np.zeros_like(game_over)
    life_lost[1:] = lives[1:] < lives[:-1]
    # (The first step has no previous lives count; Breakout cannot lose a life on its first step.)
    ended = life_lost | game_over | truncated
    expected = np.zeros_like(ended)
    expected[1:] = ended[:-1]
    assert ended.sum() >= 8 and game_over.sum() >= 1 and truncated.sum() >= 1  # all three kinds happen
    assert np.array_equal(b["is_reset"].numpy(), expected)
    # envpool's side of the rule: a reset step pays nothing and takes no game time...
    reset = expected[1:]
    assert np.all(b["rewards"].numpy()[1:][reset] == 0)
    after_life_loss = reset & ~(game_over | truncated)[:-1]
    assert np.array_equal(elapsed[1:][after_life_loss], elapsed[:-1][after_life_loss])
    # ...and a reset step never ends an episode itself.
    assert not (b["terminations"].bool() | b["truncations"].bool())[b["is_reset"]].any()
    # Truncation is not termination: the time limit bootstraps.
    assert not b["terminations"].numpy()[truncated].any()


def test_each_finished_game_is_logged_once_with_its_unclipped_score():
    b, games, steps = random_rollout(400)
    rewards = np.stack([info["reward"] for *_, info in steps])
    over = np.stack([(info["terminated"] == 1) | trunc for _, _, _, trunc, info in steps])
    expected = []
    for t in range(len(steps)):
        for n in np.flatnonzero(over[t]):
            start = max([s + 1 for s in range(t) if over[s, n]], default=0)
            expected.append((t, rewards[start : t + 1, n].sum(), steps[t][4]["elapsed_step"][n]))
    assert len(games) == over.sum() >= 4
    assert sorted(games) == sorted(expected)


def test_game_stats_sums_unclipped_rewards_over_lives():
    stats = atari.GameStats(2)
    info = lambda reward, terminated, elapsed: {  # noqa: E731
        "reward": np.array(reward, dtype=float),
        "terminated": np.array(terminated),
        "elapsed_step": np.array(elapsed),
    }
    no_trunc = np.array([False, False])
    assert stats.step(info([4.0, 1.0], [0, 0], [1, 1]), no_trunc) == []
    # Env 0 loses a life (the episode ends, the game does not); reset step pays 0.
    assert stats.step(info([7.0, 0.0], [0, 0], [2, 2]), no_trunc) == []
    assert stats.step(info([0.0, 0.0], [0, 0], [2, 3]), no_trunc) == []
    # Env 0's game is over; env 1's is truncated by the time limit.
    ended = stats.step(info([1.0, 2.0], [1, 0], [3, 4]), np.array([False, True]))
    assert ended == [(12.0, 3), (3.0, 4)]
    assert stats.step(info([0.0, 0.0], [0, 0], [0, 0]), no_trunc) == []
    assert stats.step(info([5.0, 0.0], [1, 0], [1, 1]), no_trunc) == [(5.0, 1)]


def test_q_network_shapes_and_uint8_input():
    q_network = atari.QNetwork(4, 6)
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    q = q_network(frames)
    assert q.shape == (3, 6)
    # The Nature CNN (32-8/4, 64-4/2, 64-3/1, 512) with LayerNorm before each ReLU, on frames scaled to [0, 1].
    convs = [m for m in q_network.torso if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in q_network.torso if isinstance(m, torch.nn.LayerNorm)]
    linear = [m for m in q_network.torso if isinstance(m, torch.nn.Linear)][0]
    x = frames.float() / 255.0
    for conv, norm, (out_channels, kernel, stride) in zip(convs, norms, [(32, 8, 4), (64, 4, 2), (64, 3, 1)]):
        assert conv.weight.shape[0] == out_channels and conv.weight.shape[2:] == (kernel, kernel)
        x = torch.conv2d(x, conv.weight, conv.bias, stride=stride)
        x = torch.relu(F.layer_norm(x, x.shape[1:], norm.weight, norm.bias))
    x = torch.relu(F.layer_norm(F.linear(x.flatten(1), linear.weight, linear.bias), (512,), norms[3].weight, norms[3].bias))
    torch.testing.assert_close(q, F.linear(x, q_network.q_head.weight, q_network.q_head.bias))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("atari")
    result = run_script(
        "pqn_atari_envpool.py",
        *TINY,
        "--total-timesteps",
        "192",
        "--max-episode-steps",
        "40",
        "--eval-max-steps",
        "50",
        "--save-model",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return cwd


def test_tiny_run_logs_the_convention_scalars(saved_run):
    scalars = read_scalars(only_run_dir(saved_run))
    assert CONVENTION_SCALARS <= set(scalars)
    assert [s for s, _ in scalars["losses/td_loss"]] == [64, 128, 192]
    # Games truncated at 40 steps: every env finishes games; lengths never exceed the limit.
    assert len(scalars["charts/episodic_length"]) >= 4
    assert all(0 < v <= 40 for _, v in scalars["charts/episodic_length"])


def test_saved_model_is_the_documented_format_and_loads(saved_run):
    path = os.path.join(only_run_dir(saved_run), "pqn_atari_envpool.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == atari.MODEL_FORMAT
    assert checkpoint["env_id"] == "Breakout-v5" and checkpoint["num_actions"] == 4
    assert checkpoint["observation_shape"] == [4, 84, 84] and checkpoint["args"]["num_envs"] == 4
    atari.QNetwork(4, checkpoint["num_actions"]).load_state_dict(checkpoint["q_network"])
    result = run_script(
        "pqn_atari_envpool.py",
        "--eval-checkpoint",
        path,
        "--eval-episodes",
        "1",
        "--eval-max-steps",
        "30",
        "--no-cuda",
        cwd=saved_run,
    )
    assert result.returncode == 0, result.stderr
    assert "Breakout-v5: greedy score over 1 games" in result.stdout
    # The run's final checkpoint.pt holds the same Q-network: it evaluates the same.
    checkpoint_path = os.path.join(only_run_dir(saved_run), "checkpoint.pt")
    flags = ["--eval-episodes", "1", "--eval-max-steps", "30", "--no-cuda"]
    from_checkpoint = run_script("pqn_atari_envpool.py", "--eval-checkpoint", checkpoint_path, *flags, cwd=saved_run)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout == result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "NoSuchGame-v5"], "unknown envpool env id 'NoSuchGame-v5'"),
        (["--env-id", "CartPole-v1"], "CartPole-v1 is not an Atari env"),
        (["--num-minibatches", "3"], "not divisible by --num-minibatches 3"),
        (["--total-timesteps", "10"], "smaller than one batch"),
        (["--q-lambda", "2"], "--q-lambda must be in [0, 1]"),
        (["--eval-checkpoint", "nothing.pt"], "no checkpoint at nothing.pt"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(run_script("pqn_atari_envpool.py", *TINY, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line


class EnvsMade(Exception):
    """Stops an evaluation where it makes its envs."""


@pytest.mark.parametrize(
    "given, expected",
    [
        (set(), {"repeat_action_probability": 0.25, "noop_max": 5, "episodic_life": False}),
        ({"noop_max", "episodic_life"}, {"repeat_action_probability": 0.25, "noop_max": 7, "episodic_life": True}),
    ],
)
def test_a_saved_model_is_evaluated_with_the_env_settings_it_was_trained_with(tmp_path, monkeypatch, given, expected):
    trained = tiny_args(repeat_action_probability=0.25, noop_max=5, episodic_life=False)
    atari.save_model(str(tmp_path / "model.pt"), atari.QNetwork(4, 4), trained, 4)

    def make_atari_envs(env_id, seeds, stack_num, args, **_):
        raise EnvsMade({name: getattr(args, name) for name in expected})

    monkeypatch.setattr(atari, "make_atari_envs", make_atari_envs)
    # What is given on the command line is used instead (here --noop-max 7 --episodic-life).
    args = tiny_args(eval_checkpoint=str(tmp_path / "model.pt"), noop_max=7, episodic_life=True)
    with pytest.raises(EnvsMade) as made:
        atari.eval_checkpoint(args, given, torch.device("cpu"))
    assert made.value.args[0] == expected


@pytest.mark.parametrize("episodic_life", [True, False])
def test_training_and_evaluation_envs_are_configured_as_documented(episodic_life):
    args = tiny_args(eval_max_steps=77, repeat_action_probability=0.25, noop_max=5, episodic_life=episodic_life)
    train = atari.make_atari_envs(args.env_id, [0, 1], 4, args).config
    evaluation = atari.make_atari_envs(args.env_id, [0, 1], 4, args, evaluation=True).config
    for config in (train, evaluation):
        assert (config["img_height"], config["img_width"], config["stack_num"], config["frame_skip"]) == (84, 84, 4, 4)
        assert config["repeat_action_probability"] == 0.25 and config["noop_max"] == 5
        # Evaluation plays as training plays: a lost life ends an episode in both or in neither.
        assert config["episodic_life"] == episodic_life
    assert train["reward_clip"] and train["max_episode_steps"] == 150
    assert not evaluation["reward_clip"] and evaluation["max_episode_steps"] == 77


def test_only_envs_asked_to_render_keep_full_colour_frames():
    # --capture-video renders the student's or agent's evaluation envs only, not every env the run makes.
    args = tiny_args(capture_video=True)
    assert atari.make_atari_envs(args.env_id, [0], 4, args, evaluation=True).render_mode is None
    envs = atari.make_atari_envs(args.env_id, [0], 4, args, evaluation=True, render=True)
    envs.reset()
    assert envs.render_mode == "rgb_array" and envs.render().shape == (1, 210, 160, 3)


class ConstantQ(torch.nn.Module):
    """Q-values that do not depend on the observation: the greedy action is always `action`."""

    def __init__(self, action, num_actions=4):
        super().__init__()
        self.q = torch.nn.Parameter(torch.nn.functional.one_hot(torch.tensor(action), num_actions).float())

    def forward(self, x):
        return self.q.expand(len(x), -1)


class RandomQ(torch.nn.Module):
    """Random Q-values at every call, from a seeded generator: greedy play is random play."""

    def __init__(self, num_actions=4):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.num_actions = num_actions
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return torch.rand(len(x), self.num_actions, generator=self.generator)


class StepLimit(Recorder):
    """A Recorder that fails the test instead of running on: an evaluation that misses game over
    would otherwise play to its step limit."""

    def __init__(self, envs, max_steps):
        super().__init__(envs)
        self.max_steps = max_steps

    def recv(self):
        assert len(self.steps) < self.max_steps, f"the evaluation was still running after {self.max_steps} steps"
        return super().recv()


def test_evaluation_of_a_noop_policy_ends_at_game_over_far_below_the_step_limit():
    # Always NOOP never serves the ball. With the lives of a game as training episodes, envpool's
    # reset after each lost life presses FIRE, so the game is over once all 5 balls are lost.
    args = tiny_args(eval_max_steps=1_000_000)
    envs = StepLimit(atari.make_atari_envs(args.env_id, [0, 1], 4, args, evaluation=True), max_steps=2_000)
    scores = atari.evaluate(ConstantQ(0), envs)
    np.testing.assert_array_equal(scores, [0.0, 0.0])
    lives = np.stack([info["lives"] for *_, info in envs.steps])
    game_over = np.stack([info["terminated"] == 1 for *_, info in envs.steps])
    assert game_over.any(axis=0).all() and game_over[-1].any()  # each env's game ended, the last one at the last step
    assert not np.stack([trunc for _, _, _, trunc, _ in envs.steps]).any()
    assert (lives[game_over] == 0).all()
    assert len(envs.steps) < 1_000


def test_evaluation_score_is_the_sum_of_unclipped_rewards_over_every_life_of_the_game():
    args = tiny_args(eval_max_steps=5_000)
    envs = StepLimit(atari.make_atari_envs(args.env_id, [0, 1, 2, 3], 4, args, evaluation=True), max_steps=5_000)
    scores = atari.evaluate(RandomQ(), envs)
    rewards = np.stack([info["reward"] for *_, info in envs.steps])
    over = np.stack([(info["terminated"] == 1) | trunc for _, _, _, trunc, info in envs.steps])
    episode_ends = np.stack([term | trunc for _, _, term, trunc, _ in envs.steps])
    points_after_first_life = []
    for n in range(4):
        game_end = np.flatnonzero(over[:, n])[0]
        assert episode_ends[: game_end + 1, n].sum() == 5  # one game: five lives, each its own episode
        assert scores[n] == rewards[: game_end + 1, n].sum()
        first_life_end = np.flatnonzero(episode_ends[:, n])[0]
        points_after_first_life.append(rewards[first_life_end + 1 : game_end + 1, n].sum())
    assert max(points_after_first_life) > 0  # so the sums above include points of later lives


def test_noop_model_evaluation_from_the_command_line_ends_at_game_over(tmp_path):
    # A saved model whose greedy action is always NOOP, evaluated with a step limit no game reaches.
    q_network = atari.QNetwork(4, 4)
    with torch.no_grad():
        q_network.q_head.weight.zero_()
        q_network.q_head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    path = str(tmp_path / "noop.pt")
    atari.save_model(path, q_network, tiny_args(), 4)
    flags = ["--eval-checkpoint", path, "--eval-episodes", "2", "--eval-max-steps", "1000000", "--no-cuda"]
    result = run_script("pqn_atari_envpool.py", *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Breakout-v5: greedy score over 2 games 0.00 ± 0.00" in result.stdout


@pytest.mark.parametrize(
    "saved, message",
    [
        ({"noop_max": 0}, "--noop-max must be at least 1"),  # envpool would crash without a word
        ({"noop_max": "30"}, "holds noop_max = '30', not a int"),
        ({"repeat_action_probability": float("nan")}, "--repeat-action-probability must be a finite number"),
    ],
)
def test_broken_env_settings_in_a_saved_model_are_one_clear_line(tmp_path, saved, message):
    trained = tiny_args()
    for name, value in saved.items():  # past the checks, as in a file written by hand
        setattr(trained, name, value)
    atari.save_model(str(tmp_path / "model.pt"), atari.QNetwork(4, 4), trained, 4)
    with pytest.raises(atari.UsageError, match=message):
        atari.eval_checkpoint(tiny_args(eval_checkpoint=str(tmp_path / "model.pt")), set(), torch.device("cpu"))
