"""pqn.py --num-seeds: S agents in one process, each exactly a PQN agent on its own."""

import copy
import glob
import math
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from helpers import ROOT, only_run_dir, read_scalars, run_script

import pqn

SPACE = gym.spaces.Box(-np.inf, np.inf, (4,))
# 8 envs x 32 steps per agent and iteration, 8 iterations.
TINY = "--num-envs 8 --num-steps 32 --num-minibatches 4 --update-epochs 2 --eval-episodes 2 --no-cuda".split()


def agent_parameters(q_network, k):
    return [p[k].detach().clone() for p in q_network.parameters()]


def random_minibatch(num_agents, size, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_agents, size, 4, generator=g),
        torch.randint(3, (num_agents, size), generator=g),
        10 * torch.randn(num_agents, size, generator=g),  # large targets: the clipping acts
        (torch.rand(num_agents, size, generator=g) < 0.8).float(),
    ]


def test_agent_k_starts_as_the_lone_agent_of_its_seed():
    together = pqn.QNetwork(SPACE, 3, pqn.agent_generators([7, 8, 9]))
    for k, seed in enumerate([7, 8, 9]):
        alone = pqn.QNetwork(SPACE, 3, pqn.agent_generators([seed]))
        for p, q in zip(agent_parameters(together, k), alone.parameters()):
            assert torch.equal(p, q[0])
    # Different seeds, different networks.
    assert not torch.equal(together.network[0].weight[0], together.network[0].weight[1])


def test_an_agents_state_holds_that_agent_alone():
    together = pqn.QNetwork(SPACE, 3, pqn.agent_generators([7, 8, 9]))
    alone = pqn.QNetwork(SPACE, 3, pqn.agent_generators([8]))
    state = together.agent_state_dict(1)
    for (name, t), u in zip(state.items(), alone.state_dict().values()):
        assert torch.equal(t, u), name
        assert t.untyped_storage().nbytes() == u.untyped_storage().nbytes(), name  # what a saved file holds of it


def train(q_network, minibatches, max_grad_norm=1.0):
    optimizer = pqn.RAdam(q_network.parameters(), lr=1e-2)
    for minibatch in minibatches:
        pqn.grad_step(q_network, optimizer, *minibatch, max_grad_norm)
    return q_network


def test_an_agent_trains_as_it_would_alone_whatever_the_other_agents_see():
    # Agent 1 of a pair, after 8 gradient steps (through RAdam's rectification), is the agent trained
    # alone on its own data; and perturbing agent 0's data or parameters changes nothing of agent 1.
    pair = pqn.QNetwork(SPACE, 3, pqn.agent_generators([3, 4]))
    minibatches = [random_minibatch(2, 16, seed) for seed in range(8)]
    reference = train(copy.deepcopy(pair), minibatches)
    alone = train(pqn.QNetwork(SPACE, 3, pqn.agent_generators([4])), [[x[1:] for x in minibatch] for minibatch in minibatches])
    for p, q in zip(agent_parameters(reference, 1), alone.parameters()):
        torch.testing.assert_close(p, q[0], rtol=1e-5, atol=1e-6)

    perturbed_data = [[x.clone() for x in minibatch] for minibatch in minibatches]
    for obs, actions, returns, mask in perturbed_data:
        obs[0] += 5.0
        returns[0] *= -100.0
        mask[0] = 1.0
    perturbed_parameters = copy.deepcopy(pair)
    with torch.no_grad():
        for p in perturbed_parameters.parameters():
            p[0] = 3 * torch.randn_like(p[0])
    for network, data in [(copy.deepcopy(pair), perturbed_data), (perturbed_parameters, minibatches)]:
        trained = train(network, data)
        for p, q in zip(agent_parameters(trained, 1), agent_parameters(reference, 1)):
            assert torch.equal(p, q)
        assert not torch.equal(agent_parameters(trained, 0)[0], agent_parameters(reference, 0)[0])


def test_gradients_are_clipped_per_agent_as_each_alone_would_be():
    networks = [pqn.QNetwork(SPACE, 3, pqn.agent_generators([seed])) for seed in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    for network, scale in zip(networks, [0.001, 0.0074, 1.0]):  # norms about 0.13, 1 and 135: under, near and over the limit
        for p in network.parameters():
            p.grad = scale * torch.randn(p.shape, generator=g)
    together = pqn.QNetwork(SPACE, 3, pqn.agent_generators([1, 2, 3]))
    for p, *alone in zip(together.parameters(), *[n.parameters() for n in networks]):
        p.grad = torch.cat([q.grad for q in alone])
    norms = [torch.nn.utils.clip_grad_norm_(n.parameters(), 1.0).item() for n in networks]
    assert norms[0] < 1.0 < norms[2]
    pqn.clip_grad_norm_per_agent(together.parameters(), 1.0)
    for k, network in enumerate(networks):
        for p, q in zip(together.parameters(), network.parameters()):
            torch.testing.assert_close(p.grad[k], q.grad[0], rtol=1e-6, atol=0)


def test_each_agent_is_shuffled_on_its_own_transitions():
    # Observations name their agent, step and env: a minibatch row k must hold only agent k's
    # transitions, every transition once per epoch, and the agents' orders must differ.
    T, S, N = 4, 3, 5
    obs = torch.stack(torch.meshgrid(torch.arange(T), torch.arange(S * N), indexing="ij"), dim=-1).float()  # (t, env)
    b = {"obs": obs, "actions": torch.zeros(T, S * N, dtype=torch.long), "is_reset": torch.zeros(T, S * N, dtype=torch.bool)}
    seen = []

    def train_step(obs, actions, returns, mask):
        seen.append(obs)
        return torch.zeros(S), torch.zeros(S)

    pqn.update(train_step, b, torch.zeros(T, S * N), pqn.agent_generators([0, 1, 2]), update_epochs=2, minibatch_size=4)
    assert len(seen) == 2 * 5 and all(minibatch.shape == (S, 4, 2) for minibatch in seen)
    for epoch in (seen[:5], seen[5:]):
        rows = torch.cat(epoch, dim=1)  # [S, T * N, 2]: each agent's epoch
        for k in range(S):
            envs = rows[k, :, 1].long()
            assert ((envs // N) == k).all()
            assert sorted(map(tuple, rows[k].tolist())) == sorted((t, k * N + n) for t in range(T) for n in range(N))
        orders = [(rows[k, :, 1] - k * N) * T + rows[k, :, 0] for k in range(S)]  # the order, in agent-free terms
        assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_the_agents_envs_are_those_of_lone_runs_and_all_distinct():
    seeds = list(range(1, 33))
    together = pqn.agents_env_seeds(seeds, "training", 32)
    assert together == [s for seed in seeds for s in pqn.env_seeds(seed, "training", 32)]
    assert len(set(together)) == len(together)


@pytest.fixture(scope="module")
def three_agents(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("agents")
    result = run_script(
        "pqn.py", *TINY, "--num-seeds", "3", "--seed", "5", "--total-timesteps", "2048", "--save-model", cwd=cwd
    )
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_each_agent_logs_to_its_own_run_directory(three_agents):
    cwd, result = three_agents
    dirs = sorted(glob.glob(os.path.join(cwd, "runs", "*")))
    names = [os.path.basename(d).split("__") for d in dirs]
    assert [name[:3] for name in names] == [["CartPole-v1", "pqn", str(seed)] for seed in (5, 6, 7)]
    assert len({name[3] for name in names}) == 1  # one time stamp: one run
    logs = [read_scalars(d) for d in dirs]
    for scalars in logs:
        assert [s for s, _ in scalars["losses/td_loss"]] == [256 * i for i in range(1, 9)]
        assert len(scalars["eval/episodic_return"]) == 1 and scalars["charts/episodic_return"]
    assert len({tuple(v for _, v in scalars["losses/td_loss"]) for scalars in logs}) == 3
    assert os.listdir(dirs[0]).count("checkpoint.pt") == 1 and all("checkpoint.pt" not in os.listdir(d) for d in dirs[1:])
    assert "of 3 agents" in result.stdout


def test_each_agent_trains_as_the_lone_run_of_its_seed(three_agents, tmp_path):
    # Agent 1 (seed 6) draws its weights, envs, exploration and minibatches from its own streams, so a
    # lone run with seed 6 plays the same episodes and logs the same losses (up to the rounding of
    # batched matmuls over 3 agents instead of 1).
    cwd, _ = three_agents
    lone = run_script("pqn.py", *TINY, "--seed", "6", "--total-timesteps", "2048", cwd=tmp_path)
    assert lone.returncode == 0, lone.stderr
    together = read_scalars(sorted(glob.glob(os.path.join(cwd, "runs", "*")))[1])
    alone = read_scalars(only_run_dir(tmp_path))
    for tag in ("charts/episodic_return", "charts/episodic_length", "eval/episodic_return"):
        assert together[tag] == alone[tag], tag
    for tag in ("losses/td_loss", "losses/q_values"):
        assert [s for s, _ in together[tag]] == [s for s, _ in alone[tag]]
        np.testing.assert_allclose([v for _, v in together[tag]], [v for _, v in alone[tag]], rtol=1e-4, atol=1e-6)


def test_an_agent_that_diverges_stops_and_the_others_train_on_as_before(three_agents, tmp_path, monkeypatch, capsys):
    # Agent 1's weights turn NaN before the third update: it stops logging and saving there, and agents 0
    # and 2 log what they logged in the run where nothing diverged. The run ends with one error line.
    networks, update, calls = [], pqn.update, [0]

    class RecordedQNetwork(pqn.QNetwork):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            networks.append(self)

    def poisoned_update(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                for parameter in networks[0].parameters():
                    parameter[1] = math.nan
        return update(*args, **kwargs)

    monkeypatch.setattr(pqn, "QNetwork", RecordedQNetwork)
    monkeypatch.setattr(pqn, "update", poisoned_update)
    monkeypatch.setattr(pqn.signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C handler
    monkeypatch.chdir(tmp_path)
    flags = [*TINY, "--num-seeds", "3", "--seed", "5", "--total-timesteps", "2048", "--save-model"]
    # On one thread (conftest.py), as the run it is compared with (OMP_NUM_THREADS=1): the same rounding.
    try:
        with pytest.raises(pqn.RunFault, match=r"^1 of 3 agents diverged \(seeds 6: .*the others finished"):
            pqn.main(pqn.finalize_args(tyro.cli(pqn.Args, args=flags)), set())
    finally:
        torch.set_flush_denormal(False)  # main() set it for its arithmetic; this process goes on without
    stderr = capsys.readouterr().err
    assert "the agent with seed 6 is not finite at step 768: that agent stops, the others go on" in stderr
    dirs = sorted(glob.glob(os.path.join(tmp_path, "runs", "*")))
    logs = [read_scalars(d) for d in dirs]
    assert [s for s, _ in logs[1]["losses/td_loss"]] == [256, 512] and "eval/episodic_return" not in logs[1]
    assert all(s <= 768 for s, _ in logs[1]["charts/episodic_return"])
    assert [os.path.isfile(os.path.join(d, "pqn.pt")) for d in dirs] == [True, False, True]
    assert torch.load(os.path.join(dirs[0], "checkpoint.pt"), weights_only=True)["diverged"] == [[1, 768]]
    unharmed = [read_scalars(d) for d in sorted(glob.glob(os.path.join(three_agents[0], "runs", "*")))]
    for k in (0, 2):
        for tag in ("charts/episodic_return", "eval/episodic_return"):
            assert logs[k][tag] == unharmed[k][tag], (k, tag)
        steps, values = zip(*logs[k]["losses/td_loss"])
        assert list(steps) == [s for s, _ in unharmed[k]["losses/td_loss"]]
        np.testing.assert_allclose(values, [v for _, v in unharmed[k]["losses/td_loss"]], rtol=1e-4, atol=1e-6)
    # Evaluating the checkpoint names the diverged agent instead of playing its non-finite weights.
    flags = ["--eval-checkpoint", os.path.join(dirs[0], "checkpoint.pt"), "--seed", "5", "--eval-episodes", "2"]
    pqn.eval_checkpoint(pqn.finalize_args(tyro.cli(pqn.Args, args=flags)), set(), torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "CartPole-v1 (agent 1 of 3): not evaluated, it diverged at step 768 of its training"
    assert [
        line.startswith(f"CartPole-v1 (agent {k} of 3): greedy return over 2 episodes") for k, line in enumerate(lines)
    ] == [
        True,
        False,
        True,
    ]


def test_each_agents_saved_model_evaluates_as_that_agent_of_the_checkpoint(three_agents):
    cwd, _ = three_agents
    dirs = sorted(glob.glob(os.path.join(cwd, "runs", "*")))
    all_agents = run_script(
        "pqn.py", "--eval-checkpoint", os.path.join(dirs[0], "checkpoint.pt"), "--seed", "5", "--no-cuda", cwd=cwd
    )
    assert all_agents.returncode == 0, all_agents.stderr
    lines = all_agents.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("CartPole-v1 (agent 1 of 3): greedy return over 10 episodes")
    saved = torch.load(os.path.join(dirs[1], "pqn.pt"), weights_only=True)
    assert saved["args"]["seed"] == 6 and saved["args"]["num_seeds"] == 1
    alone = run_script("pqn.py", "--eval-checkpoint", os.path.join(dirs[1], "pqn.pt"), "--seed", "6", "--no-cuda", cwd=cwd)
    assert alone.returncode == 0, alone.stderr
    # Agent 1 evaluated alone on the envs of its seed plays the same episodes as in the checkpoint.
    assert alone.stdout.strip() == lines[1].replace(" (agent 1 of 3)", "")


def test_an_interrupted_run_of_several_agents_resumes_all_of_them(tmp_path, monkeypatch):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pqn.py"), *TINY, "--num-seeds", "2", "--total-timesteps", "40960"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the first progress line, then interrupt: the run stops with a checkpoint.
    assert process.stdout.readline().startswith("step ")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, stderr
    first = sorted(glob.glob(os.path.join(tmp_path, "runs", "*")))[0]
    assert f"--resume {os.path.relpath(first, tmp_path)}" in stderr
    saved = torch.load(os.path.join(first, "checkpoint.pt"), weights_only=True)
    assert 0 < saved["global_step"] < 40960 and len(saved["recent_returns"]) == len(saved["agent_rngs"]) == 2
    # Resumed here, in this process: each agent's first exploration noise continues its saved stream.
    first_draws, draw_noise = [], pqn.draw_noise

    def recorded(generators, *args):
        if not first_draws:
            first_draws.extend(g.get_state() for g in generators)
        return draw_noise(generators, *args)

    monkeypatch.setattr(pqn, "draw_noise", recorded)
    monkeypatch.setattr(pqn.signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C handler
    monkeypatch.setattr(torch, "set_flush_denormal", lambda _: True)  # nor does this process's arithmetic change
    monkeypatch.chdir(tmp_path)
    state = pqn.load_training_state(os.path.relpath(first, tmp_path))
    given = {"resume", "cuda"}
    args = pqn.resumed_args(
        tyro.cli(pqn.Args, args=["--resume", os.path.relpath(first, tmp_path), "--no-cuda"]), given, state["args"]
    )
    assert pqn.main(pqn.finalize_args(args), given, state) == 0
    assert all(torch.equal(drawn, saved_state) for drawn, saved_state in zip(first_draws, saved["agent_rngs"], strict=True))
    for run_dir in sorted(glob.glob(os.path.join(tmp_path, "runs", "*"))):
        assert [s for s, _ in read_scalars(run_dir)["losses/td_loss"]] == [256 * i for i in range(1, 161)]


def test_wandb_with_several_agents_is_one_clear_line(tmp_path):
    result = run_script("pqn.py", *TINY, "--num-seeds", "2", "--track", cwd=tmp_path)
    assert result.returncode == 2 and "--track logs one run per process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_more_agents_than_open_log_files_allow_are_refused_before_training(monkeypatch):
    # Each agent keeps a TensorBoard file open: past the limit, the run would die making its writers.
    monkeypatch.setattr(pqn.resource, "getrlimit", lambda _: (300, 300))
    pqn.finalize_args(pqn.Args(num_seeds=300 - pqn.FILES_BESIDE_AGENTS))
    with pytest.raises(pqn.UsageError, match=r"--num-seeds 100 needs one open log file per agent .* may open 300 files"):
        pqn.finalize_args(pqn.Args(num_seeds=100))


@pytest.mark.parametrize("shape", [(0, 4, 128), (100_000, 0, 128)])
def test_a_file_of_empty_weights_is_refused_before_its_agents_are_made(tmp_path, shape):
    # The agent count comes from the weights' shape: (100000, 0, 128) would make 100,000 agents of nothing.
    path = str(tmp_path / "empty.pt")
    torch.save(
        {"args": {"env_id": "CartPole-v1"}, "q_network": {"network.0.weight": torch.zeros(shape)}},
        path,
    )
    args = pqn.finalize_args(pqn.Args(eval_checkpoint=path))
    with pytest.raises(pqn.UsageError, match="empty.pt holds empty weights: not a pqn.py model"):
        pqn.eval_checkpoint(args, set(), torch.device("cpu"))
