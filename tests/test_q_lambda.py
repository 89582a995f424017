"""q_lambda_returns against the forward-view definition of Peng's Q(lambda), written loop by loop."""

import pytest
import torch

from pqn import q_lambda_returns


def random_rollout(T=16, N=6, seed=0, p_end=0.2):
    """Random [T, N] data that respects the episode-boundary rule: after every episode end
    (terminated xor truncated) comes a reset step with reward 0 and no end."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, N, generator=g)
    next_q = torch.randn(T, N, generator=g)
    terminations = torch.zeros(T, N)
    truncations = torch.zeros(T, N)
    is_reset = torch.zeros(T, N, dtype=torch.bool)
    for n in range(N):
        for t in range(T):
            if t > 0 and (terminations[t - 1, n] or truncations[t - 1, n]):
                is_reset[t, n] = True
                rewards[t, n] = 0.0
            elif torch.rand(1, generator=g).item() < p_end:
                if torch.rand(1, generator=g).item() < 0.5:
                    terminations[t, n] = 1.0
                else:
                    truncations[t, n] = 1.0
    return rewards, terminations, truncations, next_q, is_reset


def n_step_return(rewards, terminations, truncations, next_q, gamma, t, n, steps):
    """G^(steps)_t for env n: `steps` rewards, then the bootstrap max_a Q, unless terminated."""
    g = 0.0
    for k in range(steps):
        g += gamma**k * rewards[t + k, n].item()
        if terminations[t + k, n]:
            return g
        if truncations[t + k, n] or k == steps - 1:
            return g + gamma ** (k + 1) * next_q[t + k, n].item()
    raise AssertionError("unreachable")


def reference(rewards, terminations, truncations, next_q, gamma, lam):
    """Forward view: G^lambda_t = (1 - lam) sum_{n<H} lam^(n-1) G^(n)_t + lam^(H-1) G^(H)_t, where H is
    the number of steps from t to the end of the episode or of the rollout, whichever comes first."""
    T, N = rewards.shape
    out = torch.zeros(T, N)
    for n in range(N):
        for t in range(T):
            H = 1
            while t + H - 1 < T - 1 and not (terminations[t + H - 1, n] or truncations[t + H - 1, n]):
                H += 1
            value = 0.0
            for steps in range(1, H):
                value += (
                    (1 - lam)
                    * lam ** (steps - 1)
                    * n_step_return(rewards, terminations, truncations, next_q, gamma, t, n, steps)
                )
            value += lam ** (H - 1) * n_step_return(rewards, terminations, truncations, next_q, gamma, t, n, H)
            out[t, n] = value
    return out


@pytest.mark.parametrize("lam", [0.0, 0.65, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_forward_view_reference(lam, seed):
    rewards, term, trunc, next_q, _ = random_rollout(seed=seed)
    assert term.sum() > 0 and trunc.sum() > 0
    got = q_lambda_returns(rewards, term, trunc, next_q, 0.97, lam)
    torch.testing.assert_close(got, reference(rewards, term, trunc, next_q, 0.97, lam), rtol=1e-5, atol=1e-5)


def test_accepts_bool_flags():
    rewards, term, trunc, next_q, _ = random_rollout(seed=3)
    torch.testing.assert_close(
        q_lambda_returns(rewards, term.bool(), trunc.bool(), next_q, 0.99, 0.65),
        q_lambda_returns(rewards, term, trunc, next_q, 0.99, 0.65),
    )


def test_lambda_zero_is_one_step_q_learning():
    rewards, term, trunc, next_q, _ = random_rollout(seed=4)
    got = q_lambda_returns(rewards, term, trunc, next_q, 0.9, 0.0)
    torch.testing.assert_close(got, rewards + 0.9 * (1 - term) * next_q)


def test_lambda_one_without_truncation_is_monte_carlo():
    T, N, gamma = 10, 4, 0.9
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(T, N, generator=g)
    term = torch.zeros(T, N)
    term[3, 0] = term[T - 1, :] = 1.0  # env 0 has two episodes; every episode terminates in the rollout
    rewards[4, 0] = 0.0  # reset step
    got = q_lambda_returns(rewards, term, torch.zeros(T, N), torch.randn(T, N, generator=g), gamma, 1.0)
    for n in range(N):
        for t in range(T):
            end = 3 if (n == 0 and t <= 3) else T - 1
            expected = sum(gamma ** (k - t) * rewards[k, n].item() for k in range(t, end + 1))
            if not (n == 0 and t == 4):  # the reset step's own value is never used
                assert got[t, n].item() == pytest.approx(expected, abs=1e-5)


def test_values_after_an_episode_end_do_not_leak_back():
    rewards, term, trunc, next_q, is_reset = random_rollout(seed=6)
    before = q_lambda_returns(rewards, term, trunc, next_q, 0.99, 1.0)
    # Change everything (reward and bootstrap value) from each env's first reset step on.
    first_reset = torch.where(is_reset.any(0), is_reset.float().argmax(0), torch.full((is_reset.shape[1],), is_reset.shape[0]))
    later = torch.arange(rewards.shape[0])[:, None] >= first_reset[None, :]
    rewards2, next_q2 = rewards.clone(), next_q.clone()
    rewards2[later] += 100.0
    next_q2[later] -= 100.0
    after = q_lambda_returns(rewards2, term, trunc, next_q2, 0.99, 1.0)
    assert is_reset.any() and later.any()
    for n in range(rewards.shape[1]):
        k = first_reset[n].item()
        torch.testing.assert_close(after[:k, n], before[:k, n])


def test_truncation_bootstraps_termination_does_not():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    term = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    trunc = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    next_q = torch.tensor([[5.0, 5.0], [7.0, 7.0]])
    got = q_lambda_returns(rewards, term, trunc, next_q, 0.5, 0.9)
    assert got[0, 0].item() == pytest.approx(1.0)  # terminated: reward only
    assert got[0, 1].item() == pytest.approx(1.0 + 0.5 * 5.0)  # truncated: value of the final observation
