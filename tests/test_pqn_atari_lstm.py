"""pqn_atari_envpool_lstm.py: recurrent state handling, replay equivalence, logging, bad input."""

import os

import numpy as np
import pytest
import torch
import tyro
from helpers import NEEDS_INDUCTOR, error_line, mutated_inputs_cuda_graphs_would_skip, only_run_dir, read_scalars, run_script
from test_pqn_cli import CONVENTION_SCALARS

import pqn_atari_envpool_lstm as lstm

TINY = ["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--eval-episodes", "2", "--no-cuda"]


def tiny_args(**overrides):
    args = lstm.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64, max_episode_steps=60)
    for name, value in overrides.items():
        setattr(args, name, value)
    return lstm.finalize_args(args)


def start_carry(env_groups, q_network, num_envs):
    obs = np.concatenate([envs.reset()[0] for envs in env_groups])
    return (
        torch.as_tensor(obs),
        np.zeros(num_envs, dtype=bool),
        torch.ones(num_envs, dtype=torch.bool),
        q_network.initial_state(num_envs),
    )


@pytest.fixture(scope="module")
def two_rollouts():
    """Two consecutive random rollouts on real Breakout, with lost lives, game overs and truncations,
    from two env groups (each group's slice of the recurrent state is updated on its own)."""
    args = tiny_args()
    half = args.num_envs // 2
    env_groups = [
        lstm.make_atari_envs(args.env_id, list(range(half)), 1, args),
        lstm.make_atari_envs(args.env_id, list(range(half, 2 * half)), 1, args),
    ]
    torch.manual_seed(0)
    q_network = lstm.RecurrentQNetwork(int(env_groups[0].action_space.n))
    carry = start_carry(env_groups, q_network, args.num_envs)
    stats = [lstm.GameStats(half), lstm.GameStats(half)]
    policy = lambda *inputs: lstm.act(q_network, *inputs)  # noqa: E731
    staging = torch.empty(carry[0].shape, dtype=torch.uint8)
    b1, carry, _ = lstm.rollout(env_groups, policy, carry, torch.tensor(0.5), 150, stats, staging)
    b2, carry, _ = lstm.rollout(env_groups, policy, carry, torch.tensor(0.5), 150, stats, staging)
    return q_network, b1, b2


def test_replay_reproduces_the_acting_q_values(two_rollouts):
    q_network, b1, b2 = two_rollouts
    for b in (b1, b2):
        assert b["episode_start"][1:].sum() >= 4  # episodes start inside the rollout
        with torch.no_grad():
            q, _ = q_network(b["obs"], b["initial_state"], b["episode_start"])
        torch.testing.assert_close(q.max(dim=2).values, b["max_q"], rtol=0, atol=1e-5)
        # The same holds for a minibatch of envs, as the update replays them.
        envs = torch.tensor([3, 1])
        with torch.no_grad():
            q_mb, _ = q_network(b["obs"][:, envs], tuple(s[:, envs] for s in b["initial_state"]), b["episode_start"][:, envs])
        torch.testing.assert_close(q_mb.max(dim=2).values, b["max_q"][:, envs], rtol=0, atol=1e-5)


def test_episode_starts_follow_reset_steps_across_rollouts(two_rollouts):
    _, b1, b2 = two_rollouts
    is_reset = torch.cat([b1["is_reset"], b2["is_reset"]])
    starts = torch.cat([b1["episode_start"], b2["episode_start"]])
    assert starts[0].all()  # the first observation after envs.reset()
    assert torch.equal(starts[1:], is_reset[:-1])
    # A reset step still sees its ended episode's state; only the observation it returns is a start.
    assert not (starts & is_reset).any()


def test_state_is_zeroed_exactly_at_episode_starts():
    torch.manual_seed(0)
    q_network = lstm.RecurrentQNetwork(4)
    T, B = 10, 3
    frames = torch.randint(0, 256, (T, B, 1, 84, 84), dtype=torch.uint8)
    state = tuple(torch.randn(1, B, 128) for _ in range(2))
    starts = torch.zeros(T, B, dtype=torch.bool)
    starts[4, 0] = starts[7, 0] = starts[2, 2] = True
    with torch.no_grad():
        q, _ = q_network(frames, state, starts)
        for n, segments in [(0, [(0, 4), (4, 7), (7, 10)]), (1, [(0, 10)]), (2, [(0, 2), (2, 10)])]:
            for begin, end in segments:
                # Each segment from an episode start equals a fresh run from the zero state...
                seg_state = tuple(s[:, n : n + 1] for s in state) if begin == 0 else q_network.initial_state(1)
                expected, _ = q_network(frames[begin:end, n : n + 1], seg_state, torch.zeros(end - begin, 1, dtype=torch.bool))
                torch.testing.assert_close(q[begin:end, n : n + 1], expected, rtol=0, atol=1e-6)
        # ...and nowhere else: without the start at t=4, env 0's Q-values after it change.
        no_start = starts.clone()
        no_start[4, 0] = False
        q_other, _ = q_network(frames, state, no_start)
        assert not torch.allclose(q_other[4:7, 0], q[4:7, 0])
        torch.testing.assert_close(q_other[7:, 0], q[7:, 0])


def test_update_leaves_reset_steps_out_of_the_loss(two_rollouts):
    _, b, _ = two_rollouts
    returns = lstm.q_lambda_returns(b["rewards"], b["terminations"], b["truncations"], b["next_q"], 0.99, 0.65)

    def updated(returns):
        torch.manual_seed(1)
        q_network = lstm.RecurrentQNetwork(4)
        optimizer = torch.optim.RAdam(q_network.parameters(), lr=1e-3)
        train_step = lambda *minibatch: lstm.grad_step(q_network, optimizer, *minibatch, max_grad_norm=10.0)  # noqa: E731
        lstm.update(train_step, b, returns, update_epochs=1, num_minibatches=2)
        return torch.cat([p.detach().flatten() for p in q_network.parameters()])

    assert b["is_reset"].any()
    reference = updated(returns)
    assert torch.equal(updated(torch.where(b["is_reset"], returns + 1e3, returns)), reference)
    changed = returns.clone()
    changed[~b["is_reset"]] += 1.0
    assert not torch.allclose(updated(changed), reference)


@pytest.fixture
def allow_rnn():
    """Dynamo traces through nn.LSTM, as the script's main lets it with --compile."""
    with torch._dynamo.config.patch(allow_rnn=True):
        yield


@NEEDS_INDUCTOR
def test_compiled_gradient_steps_match_the_plain_ones(two_rollouts, allow_rnn):
    # --compile traces through the LSTM (its backward included) into one graph; 6 steps and 2 envs
    # of the rollout keep the compilation short.
    _, b, _ = two_rollouts
    returns = lstm.q_lambda_returns(b["rewards"], b["terminations"], b["truncations"], b["next_q"], 0.99, 0.65)
    h0, c0 = b["initial_state"]
    envs = torch.tensor([0, 2])
    minibatch = (
        b["obs"][:6, envs],
        b["actions"][:6, envs],
        returns[:6, envs],
        (~b["is_reset"][:6, envs]).float(),
        b["episode_start"][:6, envs],
        h0[:, envs],
        c0[:, envs],
    )
    steps = {}
    for compile in [False, True]:
        torch.manual_seed(1)
        q_network = lstm.RecurrentQNetwork(4)
        optimizer = lstm.RAdam(q_network.parameters(), lr=1e-3)
        step = lstm.accelerate(
            lambda *mb: lstm.grad_step(q_network, optimizer, *mb, max_grad_norm=10.0), compile=compile, cudagraphs=False
        )
        steps[compile] = [step(*minibatch) for _ in range(2)], list(q_network.parameters())
    (plain_out, plain_params), (fast_out, fast_params) = steps[False], steps[True]
    torch.testing.assert_close(fast_out, plain_out)
    for p_fast, p_plain in zip(fast_params, plain_params):
        torch.testing.assert_close(p_fast, p_plain, rtol=1e-5, atol=1e-6)


def test_compiled_steps_only_mutate_what_cuda_graphs_keep_in_place(allow_rnn):
    # The LSTM's steps, traced through nn.LSTM, change nothing in place but the parameters and
    # RAdam's state, which CUDA graphs keep at their addresses (see test_fast_path.py for pqn.py).
    q_network = lstm.RecurrentQNetwork(4)
    optimizer = lstm.RAdam(q_network.parameters(), lr=1e-3, static_state=True)  # as with --cudagraphs
    T, B = 3, 2
    frames = torch.randint(0, 256, (T, B, 1, 84, 84), dtype=torch.uint8)
    h0, c0 = torch.zeros(1, B, 128), torch.zeros(1, B, 128)
    episode_start = torch.tensor([[True, False], [False, True], [False, False]])
    minibatch = (frames, torch.randint(4, (T, B)), torch.randn(T, B), torch.ones(T, B), episode_start, h0, c0)
    step = lambda *mb: lstm.grad_step(q_network, optimizer, *mb, max_grad_norm=10.0)  # noqa: E731
    assert mutated_inputs_cuda_graphs_would_skip(step, *minibatch) == []
    policy = lambda *inputs: lstm.act(q_network, *inputs)  # noqa: E731
    assert mutated_inputs_cuda_graphs_would_skip(policy, frames[0], (h0, c0), episode_start[0], torch.tensor(0.1)) == []


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lstm")
    result = run_script(
        "pqn_atari_envpool_lstm.py",
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
    assert all(0 < v <= 40 for _, v in scalars["charts/episodic_length"])


def test_saved_model_loads_and_evaluates(saved_run):
    path = os.path.join(only_run_dir(saved_run), "pqn_atari_envpool_lstm.pt")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["format"] == lstm.MODEL_FORMAT and checkpoint["observation_shape"] == [1, 84, 84]
    lstm.RecurrentQNetwork(checkpoint["num_actions"]).load_state_dict(checkpoint["q_network"])
    result = run_script(
        "pqn_atari_envpool_lstm.py",
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
    from_checkpoint = run_script("pqn_atari_envpool_lstm.py", "--eval-checkpoint", checkpoint_path, *flags, cwd=saved_run)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout == result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-minibatches", "3"], "--num-envs 4 is not divisible by --num-minibatches 3"),
        (
            ["--num-envs", "6", "--num-minibatches", "4", "--num-steps", "2"],
            "--num-envs 6 is not divisible by --num-minibatches 4",
        ),
        (["--env-id", "Acrobot-v1"], "Acrobot-v1 is not an Atari env"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(run_script("pqn_atari_envpool_lstm.py", *TINY, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line


def test_lstm_initialisation():
    q_network = lstm.RecurrentQNetwork(4)
    for name, param in q_network.lstm.named_parameters():
        if "bias" in name:
            assert torch.all(param == 0)
        else:  # orthogonal, gain 1: each 128-row gate block has orthonormal rows
            w = param.detach()
            assert w.shape[0] == 4 * 128
            gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
            torch.testing.assert_close(gram, torch.eye(gram.shape[0]), rtol=0, atol=1e-4)
    assert torch.all(q_network.q_head.bias.detach() == 0)


class RecordingQ(torch.nn.Module):
    """Random Q-values from a seeded generator (greedy play is random play) that records the
    episode starts each call is given: where the state would be zeroed."""

    def __init__(self, num_actions=4):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.num_actions = num_actions
        self.generator = torch.Generator().manual_seed(0)
        self.episode_starts = []

    def initial_state(self, num_envs, device=None):
        return lstm.RecurrentQNetwork.initial_state(self, num_envs, device)

    def forward(self, frames, state, episode_start):
        self.episode_starts.append(episode_start[0].clone())
        T, B = episode_start.shape
        return torch.rand(T, B, self.num_actions, generator=self.generator), state


def test_evaluation_zeroes_the_state_where_training_does():
    # The same envs and the same action sequence, once through training's rollout, once through
    # the evaluation: the state must be zeroed at the same steps.
    args = tiny_args(max_episode_steps=1_000, eval_max_steps=1_000)
    train_q, eval_q = RecordingQ(), RecordingQ()
    train_envs = lstm.make_atari_envs(args.env_id, [0, 1], 1, args)
    carry = start_carry([train_envs], train_q, 2)
    policy = lambda *inputs: lstm.act(train_q, *inputs)  # noqa: E731
    staging = torch.empty(carry[0].shape, dtype=torch.uint8)
    b, _, _ = lstm.rollout([train_envs], policy, carry, torch.tensor(0.0), 150, [lstm.GameStats(2)], staging)
    scores = lstm.evaluate(eval_q, lstm.make_atari_envs(args.env_id, [0, 1], 1, args, evaluation=True))
    assert scores.shape == (2,)
    eval_starts = torch.stack(eval_q.episode_starts)
    assert len(eval_starts) > 150 and b["episode_start"][1:].sum() >= 4  # lives are lost inside the compared steps
    assert torch.equal(eval_starts[:150], b["episode_start"])


def test_noop_model_evaluation_from_the_command_line_ends_at_game_over(tmp_path):
    # A saved model whose greedy action is always NOOP, evaluated with a step limit no game reaches.
    q_network = lstm.RecurrentQNetwork(4)
    with torch.no_grad():
        q_network.q_head.weight.zero_()
        q_network.q_head.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    path = str(tmp_path / "noop.pt")
    lstm.save_model(path, q_network, tiny_args(), 4)
    flags = ["--eval-checkpoint", path, "--eval-episodes", "2", "--eval-max-steps", "1000000", "--no-cuda"]
    result = run_script("pqn_atari_envpool_lstm.py", *flags, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Breakout-v5: greedy score over 2 games 0.00 ± 0.00" in result.stdout


def test_compile_traces_the_lstm_without_a_graph_break(tmp_path, monkeypatch):
    # Dynamo breaks the graph at nn.LSTM unless allowed, and then --compile fuses nothing across it; the
    # script's main allows it. Dynamo traces alike for every backend: "eager" spares Inductor's compile
    # time, and fullgraph=True turns a graph break into an error.
    compiled, compile = [], torch.compile

    def traced_whole(fn, **_):
        compiled.append(fn)
        return compile(fn, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", traced_whole)
    monkeypatch.setattr(lstm.signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C handler
    monkeypatch.setattr(torch, "set_flush_denormal", lambda _: True)  # nor does this process's arithmetic change
    monkeypatch.chdir(tmp_path)
    args = lstm.finalize_args(
        tyro.cli(lstm.Args, args=[*TINY, *"--total-timesteps 128 --eval-max-steps 30 --compile".split()])
    )
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=False, trace_autograd_ops=False):  # as in a fresh process
        assert lstm.main(args, set()) == 0
    assert len(compiled) == 2  # the policy and the gradient step
    assert [s for s, _ in read_scalars(only_run_dir(tmp_path))["losses/td_loss"]] == [64, 128]
