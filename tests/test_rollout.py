"""Episode boundaries in pqn.py's rollout on a scripted vector env (the README's episode-boundary rule)."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import assert_greedy

import pqn


class ScriptedEnvs(gym.vector.VectorEnv):
    """A vector env with scripted episodes and gymnasium's next-step auto-reset.

    episodes[n] lists env n's episodes as (length, "term" | "trunc"). The observation is
    (env, episode, step in episode); every real step gives reward 1 + step/10. After an episode
    ends, the next step ignores the action and returns the first observation of the next episode
    with reward 0: a reset step.
    """

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, episodes):
        self.episodes = episodes
        self.num_envs = len(episodes)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.single_action_space = gym.spaces.Discrete(2)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)

    def _obs(self):
        return np.stack([np.arange(self.num_envs), self.episode, self.t], axis=1).astype(np.float32)

    def reset(self, seed=None, options=None):
        self.episode = np.zeros(self.num_envs, dtype=np.int64)
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        self.ended = np.zeros(self.num_envs, dtype=bool)
        return self._obs(), {}

    def step(self, actions):
        reward = np.zeros(self.num_envs)
        term = np.zeros(self.num_envs, dtype=bool)
        trunc = np.zeros(self.num_envs, dtype=bool)
        for n in range(self.num_envs):
            if self.ended[n]:
                self.episode[n] += 1
                self.t[n] = 0
                self.ended[n] = False
                continue
            self.t[n] += 1
            reward[n] = 1.0 + self.t[n] / 10
            length, how = self.episodes[n][self.episode[n]]
            if self.t[n] == length:
                self.ended[n] = True
                term[n], trunc[n] = how == "term", how == "trunc"
        return self._obs(), reward, term, trunc, {}


class ObsValueQ(torch.nn.Module):
    """Q(s) = s @ W: a fixed function of the observation, different for every observation."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.5, -0.3], [1.0, 2.0], [0.25, 0.75]]))

    def forward(self, x):
        return x @ self.w


SCRIPT = [
    [(3, "term"), (4, "trunc"), (50, "term")],  # ends at steps 2 and 7; resets at 3 and 8
    [(5, "trunc"), (50, "term")],  # ends at step 4 (last step of the first rollout); reset at 5
    [(50, "term")],  # never ends
]


def start(envs):
    obs, _ = envs.reset(seed=0)
    return torch.as_tensor(obs), np.zeros(envs.num_envs, dtype=bool)


def run(envs, q_network, obs, is_reset, epsilon, num_steps, episode_stats=None):
    policy = lambda obs, epsilon: pqn.act(q_network, obs, epsilon, torch.rand(obs.shape[0], 2))  # noqa: E731
    episode_stats = episode_stats or pqn.EpisodeStats(envs.num_envs)
    return pqn.rollout(envs, policy, obs, is_reset, torch.tensor(epsilon), num_steps, episode_stats)


def test_reset_steps_are_marked_and_masked_across_rollouts():
    envs = ScriptedEnvs(SCRIPT)
    obs, is_reset = start(envs)
    stats = pqn.EpisodeStats(envs.num_envs)
    b1, obs, is_reset, eps1 = run(envs, ObsValueQ(), obs, is_reset, 0.0, 5, stats)
    b2, obs, is_reset, eps2 = run(envs, ObsValueQ(), obs, is_reset, 0.0, 5, stats)
    resets = torch.cat([b1["is_reset"], b2["is_reset"]])
    expected = torch.zeros(10, 3, dtype=torch.bool)
    expected[3, 0] = expected[8, 0] = expected[5, 1] = True
    assert torch.equal(resets, expected)
    # A reset step acts on the final observation of the ended episode...
    assert b1["obs"][3, 0].tolist() == [0, 0, 3]
    assert b2["obs"][0, 1].tolist() == [1, 0, 5]
    # ...and its transition (reward 0, into the first observation of the next episode) is not real.
    assert b1["rewards"][3, 0] == 0 and b1["terminations"][3, 0] == 0 and b1["truncations"][3, 0] == 0
    # Episodes are logged once each, with their real length (the reset step does not count).
    assert [(s, env, length) for s, env, _, length in eps1] == [(2, 0, 3), (4, 1, 5)]
    assert [(s, env, length) for s, env, _, length in eps2] == [(2, 0, 4)]
    assert eps1[0][2] == pytest.approx(1.1 + 1.2 + 1.3)


def test_td_loss_ignores_masked_steps():
    # Three agents' minibatches [S, M]: each agent's loss is the mean over its own real steps.
    g = torch.Generator().manual_seed(0)
    q, returns = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    mask = (torch.rand(3, 20, generator=g) < 0.7).float()
    loss = pqn.td_loss(q, returns, mask)
    for k in range(3):
        assert loss[k].item() == pytest.approx(((q[k] - returns[k])[mask[k].bool()] ** 2).mean().item())
    q2, returns2 = q.clone(), returns.clone()
    q2[~mask.bool()] += 1e3
    returns2[~mask.bool()] -= 1e3
    torch.testing.assert_close(pqn.td_loss(q2, returns2, mask), loss)
    # Masked-out steps get no gradient.
    q3 = q.clone().requires_grad_()
    pqn.td_loss(q3, returns, mask).sum().backward()
    assert torch.all(q3.grad[~mask.bool()] == 0) and torch.all(q3.grad[mask.bool()] != 0)


def test_truncation_bootstraps_from_the_final_observation_and_termination_does_not():
    envs = ScriptedEnvs(SCRIPT)
    q_network = ObsValueQ()
    obs, is_reset = start(envs)
    b, *_ = run(envs, q_network, obs, is_reset, 0.0, 10)
    gamma = 0.9
    returns = pqn.q_lambda_returns(b["rewards"], b["terminations"], b["truncations"], b["next_q"], gamma, 0.65)
    with torch.no_grad():

        def max_q(*o):
            return q_network(torch.tensor([o], dtype=torch.float32)).max().item()

        # Env 0, step 7: the second episode is truncated after 4 steps; final obs (0, 1, 4).
        assert b["truncations"][7, 0] == 1
        assert b["next_q"][7, 0].item() == pytest.approx(max_q(0, 1, 4))
        assert returns[7, 0].item() == pytest.approx(1.4 + gamma * max_q(0, 1, 4))
        # Env 1, step 4: truncated after 5 steps.
        assert returns[4, 1].item() == pytest.approx(1.5 + gamma * max_q(1, 0, 5))
        # Env 0, step 2: terminated, no bootstrap.
        assert b["terminations"][2, 0] == 1
        assert returns[2, 0].item() == pytest.approx(1.3)
        # Env 2 never ends: the last target bootstraps from the observation after the rollout.
        assert b["next_q"][9, 2].item() == pytest.approx(max_q(2, 0, 10))


def test_epsilon_one_acts_randomly_and_zero_greedily():
    envs = ScriptedEnvs([[(100, "term")]] * 64)
    obs, is_reset = start(envs)
    torch.manual_seed(0)
    b, *_ = run(envs, ObsValueQ(), obs, is_reset, 0.0, 4)
    with torch.no_grad():
        assert_greedy(b["actions"].reshape(-1), b["obs"].reshape(-1, 3) @ ObsValueQ().w)
    b, *_ = run(envs, ObsValueQ(), obs, is_reset, 1.0, 4)
    assert 0.3 < b["actions"].float().mean().item() < 0.7


def test_mountain_car_truncates_at_200_steps():
    # The real env: a time limit is a truncation, not a termination, so PQN bootstraps there.
    # Never pushing (action 1), the car cannot reach the goal; the next step is a reset step.
    envs = pqn.make_envs("MountainCar-v0", [0, 1])
    envs.reset()
    for _ in range(199):
        _, _, term, trunc, _ = envs.step(np.ones(2, dtype=np.int64))
        assert not term.any() and not trunc.any()
    _, _, term, trunc, _ = envs.step(np.ones(2, dtype=np.int64))
    assert trunc.all() and not term.any()
    obs, reward, term, trunc, _ = envs.step(np.ones(2, dtype=np.int64))
    assert (reward == 0).all() and not (term | trunc).any()
    assert (obs[:, 1] == 0).all() and ((-0.6 <= obs[:, 0]) & (obs[:, 0] <= -0.4)).all()  # a new episode's start


def updated_parameters(b, returns):
    torch.manual_seed(0)
    q_network = pqn.QNetwork(gym.spaces.Box(-np.inf, np.inf, (3,)), 2, pqn.agent_generators([0]))
    optimizer = torch.optim.RAdam(q_network.parameters(), lr=1e-2)
    train_step = lambda *minibatch: pqn.grad_step(q_network, optimizer, *minibatch, max_grad_norm=10.0)  # noqa: E731
    pqn.update(train_step, b, returns, pqn.agent_generators([0]), update_epochs=2, minibatch_size=10)
    return torch.cat([p.detach().flatten() for p in q_network.parameters()])


def test_update_leaves_reset_steps_out_of_the_loss():
    envs = ScriptedEnvs(SCRIPT)
    obs, is_reset = start(envs)
    b, *_ = run(envs, ObsValueQ(), obs, is_reset, 0.5, 10)
    returns = pqn.q_lambda_returns(b["rewards"], b["terminations"], b["truncations"], b["next_q"], 0.99, 0.65)
    reference = updated_parameters(b, returns)
    # Whatever the targets of the reset steps are, the update is the same...
    assert torch.equal(updated_parameters(b, torch.where(b["is_reset"], returns + 1e3, returns)), reference)
    # ...while a real step's target does change it.
    changed = returns.clone()
    changed[0, 2] += 1.0
    assert not torch.allclose(updated_parameters(b, changed), reference)


def test_q_network_scales_bounded_observations_to_unit_range():
    # An unbounded dimension (inf, or float32's largest number as some spaces write it) passes through as it is.
    big = np.finfo(np.float32).max
    low, high = np.array([-1.2, -0.07, -np.inf, -big], np.float32), np.array([0.6, 0.07, np.inf, big], np.float32)
    q_network = pqn.QNetwork(gym.spaces.Box(low, high), 3, pqn.agent_generators([0]))
    seen = []
    q_network.network[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    q_network(torch.tensor([[0.6, -0.07, 5.0, 3.0], [-0.3, 0.0, -2.0, -4.0]]))
    expected = torch.tensor([[[1.0, -1.0, 5.0, 3.0], [0.0, 0.0, -2.0, -4.0]]])  # [agent, batch, obs]
    torch.testing.assert_close(seen[0], expected)
