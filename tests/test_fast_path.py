"""The fast path (--compile, --cudagraphs) of the PQN-family scripts: same numbers as the plain path."""

import copy
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from helpers import (
    NEEDS_INDUCTOR,
    ROOT,
    assert_greedy,
    error_line,
    mutated_inputs_cuda_graphs_would_skip,
    only_run_dir,
    read_scalars,
    run_script,
)

import pqn

PQN_SCRIPTS = ["pqn.py", "pqn_atari_envpool.py", "pqn_atari_envpool_lstm.py", "pdqn_minatar.py"]


@pytest.mark.parametrize("script", PQN_SCRIPTS)
def test_cudagraphs_without_a_gpu_is_one_clear_error(script, tmp_path):
    result = run_script(script, "--cudagraphs", "--total-timesteps", "100000", cwd=tmp_path)
    assert "--cudagraphs needs a CUDA GPU" in error_line(result)
    assert result.returncode == 2


def test_the_plain_path_never_imports_dynamo(tmp_path):
    # Importing torch._dynamo adds seconds to every start; only --compile and --cudagraphs need it.
    flags = ["--total-timesteps", "2048", "--num-envs", "8", "--num-steps", "32", "--eval-episodes", "2"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", os.path.join(ROOT, "pqn.py"), *flags],
        cwd=tmp_path,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "tyro" in imported and "envpool" in imported  # what -X importtime lists
    assert not [name for name in imported if name.startswith("torch._dynamo")]


def random_rollout(T=16, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, N, generator=g),
        torch.rand(T, N, generator=g) < 0.1,
        torch.rand(T, N, generator=g) < 0.1,
        torch.randn(T, N, generator=g),
    )


@NEEDS_INDUCTOR
def test_compiled_q_lambda_returns_match_the_plain_ones():
    rollout = random_rollout()
    plain = pqn.q_lambda_returns(*rollout, 0.99, 0.65)
    compiled = pqn.accelerate(lambda *r: pqn.q_lambda_returns(*r, 0.99, 0.65), compile=True, cudagraphs=False)
    torch.testing.assert_close(compiled(*rollout), plain)


def test_radam_matches_torch_optim_radam():
    # 40 steps on the same random gradients: past step 6, where the rectified update takes over.
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    reference = [p.clone() for p in ours]
    radam, torch_radam = pqn.RAdam(ours, lr=1e-2), torch.optim.RAdam(reference, lr=1e-2)
    for step in range(40):
        lr = 1e-2 * (1 - step / 40)
        radam.lr.fill_(lr)
        torch_radam.param_groups[0]["lr"] = lr
        for p, q in zip(ours, reference):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        radam.step()
        torch_radam.step()
        for p, q in zip(ours, reference):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@NEEDS_INDUCTOR
def test_compiled_acting_and_gradient_steps_match_the_plain_ones():
    space = gym.spaces.Box(-np.inf, np.inf, (4,))
    torch.manual_seed(0)
    q_plain = pqn.QNetwork(space, 3, pqn.agent_generators([0, 1]))  # two agents: the seed axis compiles too
    q_fast = copy.deepcopy(q_plain)
    # The reference is torch.optim's RAdam, stepped eagerly; the fast path is pqn.py's, compiled
    # into one graph with the forward and backward pass.
    opt_plain = torch.optim.RAdam(q_plain.parameters(), lr=1e-2)
    opt_fast = pqn.RAdam(q_fast.parameters(), lr=1e-2)
    obs = torch.randn(64, 4)  # 32 of each agent
    act_fast = pqn.accelerate(lambda o, e, n: pqn.act(q_fast, o, e, n), compile=True, cudagraphs=False)
    actions, max_q = act_fast(obs, torch.tensor(0.0), torch.rand(64, 2))  # epsilon 0: greedy
    with torch.no_grad():
        q = q_plain(obs)
    assert_greedy(actions, q)
    torch.testing.assert_close(max_q, q.max(dim=1).values)

    minibatch = (obs.view(2, 32, 4), torch.randint(3, (2, 32)), torch.randn(2, 32), (torch.rand(2, 32) < 0.8).float())
    step_fast = pqn.accelerate(lambda *mb: pqn.grad_step(q_fast, opt_fast, *mb, 1.0), compile=True, cudagraphs=False)
    for step in range(8):  # a new learning rate each step must be taken up; from step 6 RAdam is rectified
        lr = 1e-2 * (1 - step / 8)
        opt_plain.param_groups[0]["lr"] = lr
        opt_fast.lr.fill_(lr)
        loss_plain, q_taken_plain = pqn.grad_step(q_plain, opt_plain, *minibatch, 1.0)
        loss_fast, q_taken_fast = step_fast(*minibatch)
        torch.testing.assert_close(loss_fast, loss_plain)
        torch.testing.assert_close(q_taken_fast, q_taken_plain)
        for p_fast, p_plain in zip(q_fast.parameters(), q_plain.parameters()):
            torch.testing.assert_close(p_fast, p_plain, rtol=1e-5, atol=1e-6)


@NEEDS_INDUCTOR
def test_compile_smoke_run(tmp_path):
    flags = ["--num-envs", "8", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "1", "--eval-episodes", "2"]
    result = run_script("pqn.py", *flags, "--total-timesteps", "512", "--compile", "--no-cuda", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    scalars = read_scalars(only_run_dir(tmp_path))
    assert [s for s, _ in scalars["losses/td_loss"]] == [128, 256, 384, 512]
    assert np.isfinite([v for _, v in scalars["losses/td_loss"]]).all()


def test_cudagraph_outputs_are_handed_out_as_copies():
    # A CUDA-graph replay reuses the memory of its outputs; `accelerate` copies them, keeping their
    # structure. (Without a GPU the cudagraphs backend runs the function as is; the copying is the same.)
    kept = torch.arange(3.0)
    state = (torch.ones(2), torch.zeros(2))
    graphed = pqn.accelerate(lambda x: (kept * 1, (state[0] + x, state[1])), compile=False, cudagraphs=True)
    out, (h, c) = graphed(torch.tensor(1.0))
    assert torch.equal(out, kept) and torch.equal(h, torch.full((2,), 2.0)) and torch.equal(c, state[1])
    assert c.data_ptr() != state[1].data_ptr()  # a copy, not the tensor the step returned


def test_compiled_steps_only_mutate_what_cuda_graphs_keep_in_place():
    q_network = pqn.QNetwork(gym.spaces.Box(-np.inf, np.inf, (4,)), 3, pqn.agent_generators([0, 1]))
    optimizer = pqn.RAdam(q_network.parameters(), lr=1e-2, static_state=True)  # as with --cudagraphs
    obs = torch.randn(16, 4)
    minibatch = (obs.view(2, 8, 4), torch.randint(3, (2, 8)), torch.randn(2, 8), torch.ones(2, 8))
    # The gradient step updates the parameters and RAdam's state (moments, step count) in place.
    assert mutated_inputs_cuda_graphs_would_skip(lambda *mb: pqn.grad_step(q_network, optimizer, *mb, 1.0), *minibatch) == []
    acting = (obs, torch.tensor(0.1), torch.rand(16, 2))
    assert mutated_inputs_cuda_graphs_would_skip(lambda o, e, n: pqn.act(q_network, o, e, n), *acting) == []
    # Without the marks, the step count and the 20 moment tensors would keep the step out of CUDA graphs.
    unmarked = pqn.RAdam(q_network.parameters(), lr=1e-2)
    assert (
        len(mutated_inputs_cuda_graphs_would_skip(lambda *mb: pqn.grad_step(q_network, unmarked, *mb, 1.0), *minibatch)) == 21
    )


def test_cudagraphs_backend_traces_the_steps_to_the_same_numbers():
    # --cudagraphs alone compiles with the `cudagraphs` backend (AOTAutograd, no Inductor). On the
    # CPU the graphs are traced as on a GPU and then run without CUDA graphs, so this checks the
    # tracing and the copying of outputs; the graphs themselves need a GPU.
    space = gym.spaces.Box(-np.inf, np.inf, (4,))
    torch.manual_seed(0)
    q_plain = pqn.QNetwork(space, 3, pqn.agent_generators([0, 1]))
    q_fast = copy.deepcopy(q_plain)
    opt_plain, opt_fast = pqn.RAdam(q_plain.parameters(), lr=1e-2), pqn.RAdam(q_fast.parameters(), lr=1e-2)
    obs = torch.randn(64, 4)
    minibatch = (obs.view(2, 32, 4), torch.randint(3, (2, 32)), torch.randn(2, 32), (torch.rand(2, 32) < 0.8).float())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step_fast = pqn.accelerate(lambda *mb: pqn.grad_step(q_fast, opt_fast, *mb, 1.0), compile=False, cudagraphs=True)
    act_fast = pqn.accelerate(lambda o, e, n: pqn.act(q_fast, o, e, n), compile=False, cudagraphs=True)
    targets_fast = pqn.accelerate(lambda *r: pqn.q_lambda_returns(*r, 0.99, 0.65), compile=False, cudagraphs=True)
    for _ in range(3):
        torch.testing.assert_close(step_fast(*minibatch), pqn.grad_step(q_plain, opt_plain, *minibatch, 1.0))
    for p_fast, p_plain in zip(q_fast.parameters(), q_plain.parameters()):
        torch.testing.assert_close(p_fast, p_plain, rtol=1e-5, atol=1e-6)
    actions, max_q = act_fast(obs, torch.tensor(0.0), torch.rand(64, 2))
    with torch.no_grad():
        q = q_plain(obs)
    assert_greedy(actions, q)
    torch.testing.assert_close(max_q, q.max(dim=1).values)
    rollout = random_rollout()
    torch.testing.assert_close(targets_fast(*rollout), pqn.q_lambda_returns(*rollout, 0.99, 0.65))
    # Each of the three went through the cudagraphs backend whole, which then found CPU tensors.
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == 3
    assert not torch._dynamo.utils.counters["graph_break"]
