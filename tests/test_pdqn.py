"""pdqn_minatar.py: world-model losses, imagined rollouts, planning off means plain PQN, logging."""

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_greedy, error_line, only_run_dir, read_scalars, run_script
from test_pqn_cli import CONVENTION_SCALARS

import pdqn_minatar as pdqn

MODEL_SCALARS = {
    "losses/model_loss",
    "losses/model_obs_loss",
    "losses/model_reward_loss",
    "losses/model_termination_loss",
    "losses/model_obs_accuracy",
    "losses/model_obs_recall",
}
TINY = "--num-envs 8 --num-steps 16 --num-minibatches 4 --eval-episodes 2 --max-episode-steps 100 --no-cuda".split()


def random_batch(B=6, C=4, A=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        (torch.rand(B, C, 10, 10, generator=g) < 0.1).float(),
        torch.randint(A, (B,), generator=g),
        (torch.rand(B, C, 10, 10, generator=g) < 0.1).float(),
        torch.randn(B, generator=g),
        (torch.rand(B, generator=g) < 0.3).float(),
        torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
    )


def test_model_losses_match_references():
    torch.manual_seed(0)
    model = pdqn.WorldModel(4, 3)
    obs, actions, next_obs, rewards, terms, mask = random_batch()
    with torch.no_grad():  # cells predicted above 0.5 and below, so that accuracy and recall are both in play
        model.next_obs_head.bias.copy_(torch.rand(model.next_obs_head.bias.shape, generator=torch.Generator().manual_seed(1)))
    total, obs_loss, reward_loss, term_loss, accuracy, recall = pdqn.model_losses(
        model, obs, actions, next_obs, rewards, terms, mask
    )
    with torch.no_grad():
        obs_pred, reward_pred, term_pred = model(obs, actions)
    real = [i for i in range(len(mask)) if mask[i] == 1]
    # Written out, transition by transition: squared errors, the cells' averaged per transition,
    # then each loss averaged over the real transitions.
    cell_errors = [sum(float(d) ** 2 for d in (obs_pred[i] - next_obs[i]).flatten()) / next_obs[i].numel() for i in real]
    assert obs_loss.item() == pytest.approx(sum(cell_errors) / len(real), rel=1e-5)
    assert reward_loss.item() == pytest.approx(
        sum((reward_pred[i].item() - rewards[i].item()) ** 2 for i in real) / len(real), rel=1e-5
    )
    assert term_loss.item() == pytest.approx(
        sum((term_pred[i].item() - terms[i].item()) ** 2 for i in real) / len(real), rel=1e-5
    )
    assert total.item() == pytest.approx((obs_loss + reward_loss + term_loss).item(), rel=1e-6)
    cell_hits = [((obs_pred[i] > 0.5).float() == next_obs[i]).float().mean().item() for i in real]
    assert accuracy.item() == pytest.approx(sum(cell_hits) / len(real), rel=1e-6)
    # Recall: over all real transitions' set cells, the share predicted set.
    set_cells = [(i, c) for i in real for c in range(next_obs[i].numel()) if next_obs[i].flatten()[c] == 1]
    found = [bool(obs_pred[i].flatten()[c] > 0.5) for i, c in set_cells]
    assert 0 < sum(found) < len(found)
    assert recall.item() == pytest.approx(sum(found) / len(found), rel=1e-6)
    # Reset steps (mask 0) add nothing.
    real = mask.bool()
    next_obs2, rewards2 = next_obs.clone(), rewards.clone()
    next_obs2[~real], rewards2[~real] = 1.0 - next_obs2[~real], rewards2[~real] + 100.0
    again = pdqn.model_losses(model, obs, actions, next_obs2, rewards2, terms, mask)
    assert again[0].item() == pytest.approx(total.item(), rel=1e-6)


def test_model_takes_the_action_into_account():
    torch.manual_seed(0)
    model = pdqn.WorldModel(4, 3)
    obs = torch.zeros(3, 4, 10, 10)
    logits, rewards, terms = model(obs, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 4, 10, 10) and rewards.shape == (3,) and terms.shape == (3,)
    assert not torch.allclose(logits[0], logits[1])


class ScriptedModel(torch.nn.Module):
    """Predicts cells of 0.3 or 0.7 at random, reward 1, and termination (0.8) for env 0 at its
    second imagined step (0.2 otherwise)."""

    num_actions = 3

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, obs, actions):
        self.calls += 1
        cells = torch.where(torch.rand(obs.shape) < 0.5, 0.3, 0.7)
        terms = torch.full((obs.shape[0],), 0.2)
        if self.calls == 2:
            terms[0] = 0.8
        return cells, torch.ones(obs.shape[0]), terms


def test_imagined_rollouts_stay_binary_and_stop_at_a_predicted_termination():
    torch.manual_seed(0)
    q_network = pdqn.QNetwork(4, 3)
    obs = (torch.rand(3, 4, 10, 10) < 0.2).float()
    alive = torch.tensor([True, True, False])  # env 2's last real observation ended an episode
    imagined = pdqn.imagine(ScriptedModel(), q_network, obs, alive, planning_steps=4, epsilon=0.0)
    assert imagined["obs"].shape == (4, 3, 4, 10, 10)
    assert set(imagined["next_obs"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(imagined["next_obs"][:-1], imagined["obs"][1:])
    assert torch.equal(imagined["obs"][0], obs)
    expected_alive = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.float32)
    assert torch.equal(imagined["alive"], expected_alive)
    assert imagined["terminations"][1, 0] == 1.0
    # epsilon 0: the actions are greedy in the imagined observations (up to rounding: another batch size).
    assert_greedy(imagined["actions"].flatten(), q_network(imagined["obs"].flatten(0, 1)).detach())


def test_planning_update_uses_one_step_targets_on_live_transitions_only():
    torch.manual_seed(0)
    q_network = pdqn.QNetwork(4, 3)
    imagined = pdqn.imagine(
        ScriptedModel(), q_network, (torch.rand(3, 4, 10, 10) < 0.2).float(), torch.ones(3, dtype=torch.bool), 4, 0.5
    )
    live = imagined["alive"] == 1
    with torch.no_grad():
        next_max = q_network(imagined["next_obs"].flatten(0, 1)).max(1).values.view(4, 3)
        targets = imagined["rewards"] + 0.9 * (1 - imagined["terminations"]) * next_max
        q_taken = q_network(imagined["obs"].flatten(0, 1)).gather(1, imagined["actions"].flatten()[:, None]).view(4, 3)
    # One loss per imagined step, each the mean over that step's live transitions (Q unchanged: lr 0).
    expected = sum(((q_taken[k] - targets[k]) ** 2)[live[k]].mean() for k in range(4)) / 4
    optimizer = torch.optim.SGD(q_network.parameters(), lr=0.0)
    train_step = lambda *minibatch: pdqn.grad_step(q_network, optimizer, *minibatch, max_grad_norm=10.0)  # noqa: E731
    loss = pdqn.planning_update(train_step, q_network, imagined, 0.9)
    assert loss == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("planning_steps", [1, 5, 20])
def test_one_gradient_step_of_all_envs_per_imagined_step(planning_steps):
    torch.manual_seed(0)
    q_network, model = pdqn.make_networks(4, 3)
    obs = (torch.rand(7, 4, 10, 10) < 0.2).float()
    imagined = pdqn.imagine(model, q_network, obs, torch.ones(7, dtype=torch.bool), planning_steps, 0.1)
    assert imagined["obs"].shape[:2] == (planning_steps, 7)
    calls = []

    def train_step(obs, actions, targets, mask):
        calls.append((obs, mask))
        return torch.tensor(1.0), torch.tensor(0.0)

    imagined["alive"][:] = 1.0  # no trajectory ends, whatever the untrained model predicts
    pdqn.planning_update(train_step, q_network, imagined, 0.99)
    assert len(calls) == planning_steps
    for k, (step_obs, mask) in enumerate(calls):
        assert torch.equal(step_obs, imagined["obs"][k]) and mask.shape == (7,)


def test_planning_stops_when_every_imagined_trajectory_has_ended():
    torch.manual_seed(0)
    q_network = pdqn.QNetwork(4, 3)
    imagined = pdqn.imagine(
        ScriptedModel(), q_network, (torch.rand(1, 4, 10, 10) < 0.2).float(), torch.ones(1, dtype=torch.bool), 5, 0.0
    )
    calls = []
    pdqn.planning_update(lambda *mb: calls.append(mb) or (torch.tensor(0.0), torch.tensor(0.0)), q_network, imagined, 0.99)
    assert len(calls) == 2  # env 0's imagined episode terminates at its second step


def test_planning_from_no_live_observation_makes_no_step_and_reports_no_loss():
    # Every env's last real step ended its episode (likely with few envs): nothing is imagined from
    # them, and no loss is reported (a NaN one would stop the run as diverged).
    torch.manual_seed(0)
    q_network, model = pdqn.make_networks(4, 3)
    obs = (torch.rand(3, 4, 10, 10) < 0.2).float()
    imagined = pdqn.imagine(model, q_network, obs, torch.zeros(3, dtype=torch.bool), 4, 0.1)
    calls = []
    loss = pdqn.planning_update(
        lambda *mb: calls.append(mb) or (torch.tensor(0.0), torch.tensor(0.0)), q_network, imagined, 0.99
    )
    assert loss is None and calls == []


def test_env_observations_are_float_channels_first():
    args = pdqn.finalize_args(pdqn.Args(num_envs=2, num_steps=4, num_minibatches=1, total_timesteps=8))
    envs = pdqn.make_envs(args, 2)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 4, 10, 10) and obs.dtype == "float32" and set(obs.flatten().tolist()) <= {0.0, 1.0}
    assert envs.single_observation_space.shape == (4, 10, 10)


@pytest.mark.parametrize("planning_steps, cell_head", [("0", "linear"), ("3", "linear"), ("3", "conv")])
def test_smoke_run_logs_metrics_and_planning_off_leaves_the_model_untouched(tmp_path, planning_steps, cell_head):
    result = run_script(
        "pdqn_minatar.py",
        *TINY,
        "--total-timesteps",
        "640",
        "--planning-steps",
        planning_steps,
        "--planning-delay-updates",
        "2",
        "--model-cell-head",
        cell_head,
        "--seed",
        "3",
        "--save-model",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    scalars = read_scalars(run_dir)
    assert CONVENTION_SCALARS <= set(scalars)
    saved = torch.load(os.path.join(run_dir, "pdqn_minatar.pt"), weights_only=True)
    torch.manual_seed(3)
    _, fresh_model = pdqn.make_networks(4, 3, model_cell_head=cell_head)
    fresh = fresh_model.state_dict()
    assert saved["world_model"].keys() == fresh.keys()
    unchanged = all(torch.equal(saved["world_model"][k], fresh[k]) for k in fresh)
    if planning_steps == "0":
        assert not (MODEL_SCALARS | {"losses/planning_loss"}) & set(scalars)
        assert unchanged
    else:
        assert MODEL_SCALARS | {"losses/planning_loss"} <= set(scalars)
        assert [s for s, _ in scalars["losses/planning_loss"]] == [
            256,
            384,
            512,
            640,
        ]  # from the 2nd update (128 steps each) on
        assert not unchanged


def test_same_seed_builds_the_same_networks():
    torch.manual_seed(3)
    q1, m1 = pdqn.make_networks(4, 3)
    torch.manual_seed(3)
    q2, m2 = pdqn.make_networks(4, 3)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert F.mse_loss(q1(torch.zeros(1, 4, 10, 10)), q2(torch.zeros(1, 4, 10, 10))).item() == 0.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--env-id", "MinAtar/Pong-v1"], "unknown MinAtar env id 'MinAtar/Pong-v1'"),
        (["--env-id", "CartPole-v1"], "unknown MinAtar env id 'CartPole-v1'"),
        (["--num-minibatches", "3"], "not divisible by --num-minibatches 3"),
        (["--planning-steps", "-1"], "--planning-steps must not be negative"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(run_script("pdqn_minatar.py", *TINY, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line


def test_async_vectorization_runs(tmp_path):
    result = run_script("pdqn_minatar.py", *TINY, "--total-timesteps", "256", "--vectorization", "async", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_scalars(only_run_dir(tmp_path))["losses/td_loss"]) == 2


def test_a_model_that_predicts_change_adds_it_to_the_observation():
    torch.manual_seed(5)
    q, model = pdqn.make_networks(4, 3)
    torch.manual_seed(5)
    q_change, change = pdqn.make_networks(4, 3, model_predicts_change=True)
    # The same parameters (a run with the flag draws the same random numbers), ...
    for a, b in zip([*q.parameters(), *model.parameters()], [*q_change.parameters(), *change.parameters()]):
        assert torch.equal(a, b)
    obs, actions, *_ = random_batch()
    with torch.no_grad():
        (next_obs, reward, term), (next_change, reward_change, term_change) = model(obs, actions), change(obs, actions)
    # ... the cell head's output added to the observation, the reward and termination heads as they are.
    torch.testing.assert_close(next_change, obs + next_obs, rtol=0, atol=1e-6)
    assert torch.equal(reward, reward_change) and torch.equal(term, term_change)


def conv_cells_reference(model, obs, actions):
    """The conv cell head written out: the observation with one constant plane per action (1 for the action
    taken), then per layer and per cell, the sum over its k x k neighbourhood (zeros beyond the edge) of
    weights times inputs, plus the bias, with ReLU between layers."""
    batch, channels, height, width = obs.shape
    num_actions = model.num_actions
    x = np.zeros((batch, channels + num_actions, height, width))
    x[:, :channels] = obs.numpy()
    for b in range(batch):
        x[b, channels + int(actions[b])] = 1.0
    convs = [layer for layer in model.next_obs_head if isinstance(layer, torch.nn.Conv2d)]
    for n, conv in enumerate(convs):
        weight, bias = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
        k = weight.shape[-1]
        padded = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
        out = np.zeros((batch, weight.shape[0], height, width))
        for b in range(batch):
            for i in range(height):
                for j in range(width):
                    window = padded[b, :, i : i + k, j : j + k]
                    out[b, :, i, j] = (weight * window[None]).sum(axis=(1, 2, 3)) + bias
        x = np.maximum(out, 0.0) if n < len(convs) - 1 else out
    return torch.from_numpy(x).float()


def test_the_conv_cell_head_matches_a_written_out_convolution():
    torch.manual_seed(0)
    model = pdqn.WorldModel(4, 3, cell_head="conv")
    obs, actions, *_ = random_batch(B=3)
    with torch.no_grad():
        cells, _, _ = model(obs, actions)
    torch.testing.assert_close(cells, conv_cells_reference(model, obs, actions), rtol=1e-4, atol=1e-5)


def test_a_conv_cell_sees_its_5x5_neighbourhood_and_the_action():
    torch.manual_seed(0)
    model = pdqn.WorldModel(4, 3, cell_head="conv")
    obs, actions, *_ = random_batch(B=1)
    i, j = 4, 5
    with torch.no_grad():
        cells = model(obs, actions)[0][0, :, i, j]
        for u in range(10):
            for v in range(10):
                changed = obs.clone()
                changed[0, :, u, v] = 1.0 - changed[0, :, u, v]
                moved = not torch.allclose(model(changed, actions)[0][0, :, i, j], cells, rtol=0, atol=1e-6)
                assert moved == (max(abs(u - i), abs(v - j)) <= 2), (u, v)
        other_action = (actions + 1) % 3
        assert not torch.allclose(model(obs, other_action)[0][0, :, i, j], cells, rtol=0, atol=1e-6)


def test_a_conv_model_keeps_the_reward_and_termination_heads_and_predicts_change_on_top():
    torch.manual_seed(0)
    model = pdqn.WorldModel(4, 3, cell_head="conv")
    change = pdqn.WorldModel(4, 3, predicts_change=True, cell_head="conv")
    change.load_state_dict(model.state_dict())
    obs, actions, *_ = random_batch()
    with torch.no_grad():
        (cells, reward, term), (cells_change, reward_change, term_change) = model(obs, actions), change(obs, actions)
        h = torch.cat([model.torso(obs), F.one_hot(actions, 3).float()], dim=1)
        torch.testing.assert_close(reward, model.reward_head(h).squeeze(1), rtol=0, atol=0)
        torch.testing.assert_close(term, model.termination_head(h).squeeze(1), rtol=0, atol=0)
    torch.testing.assert_close(cells_change, obs + cells, rtol=0, atol=1e-6)
    assert torch.equal(reward, reward_change) and torch.equal(term, term_change)


class EnvsMade(Exception):
    pass


@pytest.mark.parametrize(
    "given, expected",
    [
        (set(), {"sticky_action_prob": 0.0, "max_episode_steps": 500}),
        ({"sticky_action_prob"}, {"sticky_action_prob": 0.3, "max_episode_steps": 500}),
    ],
)
def test_a_saved_model_is_evaluated_with_the_env_settings_it_was_trained_with(tmp_path, monkeypatch, given, expected):
    trained = pdqn.Args(env_id="MinAtar/Breakout-v1", sticky_action_prob=0.0, max_episode_steps=500)
    q_network, world_model = pdqn.make_networks(4, 3)
    model = {"format": pdqn.MODEL_FORMAT, "q_network": q_network.state_dict(), "world_model": world_model.state_dict()}
    torch.save(dict(model, args=dataclasses.asdict(trained)), tmp_path / "model.pt")

    def make_envs(args, num_envs, render=False):
        raise EnvsMade({name: getattr(args, name) for name in expected})

    monkeypatch.setattr(pdqn, "make_envs", make_envs)
    # What is given on the command line is used instead (here --sticky-action-prob 0.3).
    args = pdqn.Args(eval_checkpoint=str(tmp_path / "model.pt"), sticky_action_prob=0.3, max_episode_steps=77)
    with pytest.raises(EnvsMade) as made:
        pdqn.eval_checkpoint(args, given, torch.device("cpu"))
    assert made.value.args[0] == expected


def test_async_envs_count_their_worker_processes_in_the_memory_check(monkeypatch):
    # 1,000 async envs are 1,000 processes of several MiB each: refused where 1,000 sync envs fit.
    monkeypatch.setattr(pdqn, "memory_available", lambda: 2**30)
    sizes = dict(num_envs=1000, num_steps=1, num_minibatches=1, total_timesteps=1000, eval_episodes=1)
    pdqn.finalize_args(pdqn.Args(vectorization="sync", **sizes))
    with pytest.raises(pdqn.UsageError, match=r"and the envs .* would take 4\.\d GiB"):
        pdqn.finalize_args(pdqn.Args(vectorization="async", **sizes))
