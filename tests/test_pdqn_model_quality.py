"""benchmark/pdqn_model_quality.py: imagined steps against the real ones, checked against a written-out
count on random data, a perfect model, a model that predicts no change, and the command line."""

import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, import_benchmark_tool, only_run_dir, run_script

import pdqn_minatar as pdqn

TOOL = os.path.join(ROOT, "benchmark", "pdqn_model_quality.py")


class ShiftModel(torch.nn.Module):
    """Exact 0/1 dynamics: channel 0 rolls right by the action, the other channels stay; the reward
    is 1 when channel 0 ends in column 0. With `broken`, the channels beyond 0 flip instead."""

    def __init__(self, broken=False):
        super().__init__()
        self.broken = broken

    def forward(self, obs, actions):
        next_obs = obs.clone()
        for i, a in enumerate(actions.tolist()):
            next_obs[i, 0] = torch.roll(obs[i, 0], a, dims=-1)
        if self.broken:
            next_obs[:, 1:] = 1 - obs[:, 1:]
        reward = next_obs[:, 0, :, 0].sum(dim=1)
        return next_obs, reward, torch.zeros(obs.shape[0])


def shift_game(T=30, N=4, C=3, reset_at=((1, 12), (2, 25)), seed=0):
    """A trajectory of ShiftModel's game; env n resets at step t for each (n, t) of `reset_at`: step t
    only brings a new random observation (real[t, n] False)."""
    g = torch.Generator().manual_seed(seed)
    obs = [(torch.rand(N, C, 10, 10, generator=g) < 0.2).float()]
    actions = torch.randint(3, (T, N), generator=g)
    real = torch.ones(T, N, dtype=torch.bool)
    rewards = torch.zeros(T, N)
    model = ShiftModel()
    for t in range(T):
        next_obs, reward, _ = model(obs[-1], actions[t])
        for n, reset in reset_at:
            if t == reset:
                next_obs[n] = (torch.rand(C, 10, 10, generator=g) < 0.2).float()
                reward[n] = 0.0
                real[t, n] = False
        obs.append(next_obs)
        rewards[t] = reward
    return torch.stack(obs), actions, rewards, real


def reference_scores(model, obs, actions, rewards, real, horizon, stride):
    """One (start, env) chain at a time, counted cell by cell in Python."""
    counts = {}
    T, N = actions.shape
    for t0 in range(0, T - horizon + 1, stride):
        for n in range(N):
            x = obs[t0, n : n + 1]
            for k in range(1, horizon + 1):
                if not real[t0 + k - 1, n]:
                    break
                x, reward, _ = pdqn.imagined_step(model, x, actions[t0 + k - 1, n : n + 1])
                c = counts.setdefault(k, {"n": 0, "cells": 0, "set": 0, "err": 0.0, "abs": 0.0})
                c["n"] += 1
                c["err"] += float(reward[0] - rewards[t0 + k - 1, n])
                c["abs"] += abs(float(reward[0] - rewards[t0 + k - 1, n]))
                for name, prediction in [("model", x[0]), ("unchanged", obs[t0, n])]:
                    for p, r in zip(prediction.flatten().tolist(), obs[t0 + k, n].flatten().tolist()):
                        c[f"{name}_right"] = c.get(f"{name}_right", 0) + (p == r)
                        c[f"{name}_hits"] = c.get(f"{name}_hits", 0) + (p == 1 and r == 1)
                        c[f"{name}_false"] = c.get(f"{name}_false", 0) + (p == 1 and r == 0)
                c["cells"] += obs[t0 + k, n].numel()
                c["set"] += int(obs[t0 + k, n].sum())
    return {
        k: {
            "transitions": c["n"],
            "reward_error": c["err"] / c["n"],
            "reward_abs_error": c["abs"] / c["n"],
            **{f"{m}_accuracy": c[f"{m}_right"] / c["cells"] for m in ("model", "unchanged")},
            **{f"{m}_recall": c[f"{m}_hits"] / c["set"] for m in ("model", "unchanged")},
            **{f"{m}_false": c[f"{m}_false"] / c["set"] for m in ("model", "unchanged")},
        }
        for k, c in counts.items()
    }


def reference_output_at_set(model, obs, actions, rewards, real, horizon, stride):
    """Per channel, the mean raw cell output one step ahead at the cells set in the real next observation."""
    sums, counts = [0.0] * obs.shape[2], [0] * obs.shape[2]
    for t0 in range(0, actions.shape[0] - horizon + 1, stride):
        for n in range(actions.shape[1]):
            if real[t0, n]:
                raw = model(obs[t0, n : n + 1], actions[t0, n : n + 1])[0][0]
                for channel in range(obs.shape[2]):
                    for r, t in zip(raw[channel].flatten().tolist(), obs[t0 + 1, n, channel].flatten().tolist()):
                        if t == 1:
                            sums[channel] += r
                            counts[channel] += 1
    return torch.tensor([s / max(c, 1) for s, c in zip(sums, counts)])


@pytest.mark.parametrize("horizon, stride", [(5, 3), (20, 1)])
def test_scores_match_a_written_out_count_on_random_data(horizon, stride):
    tool = import_benchmark_tool("pdqn_model_quality")
    data = shift_game(seed=1)
    model = ShiftModel(broken=True)  # wrong about channels 1 and 2: every score is in play
    scores = tool.compare(model, *data, horizon, stride)
    reference = reference_scores(model, *data, horizon, stride)
    assert sorted(scores) == sorted(reference) == list(range(1, horizon + 1))
    for k in reference:
        for name, value in reference[k].items():
            assert math.isclose(scores[k][name], value, rel_tol=1e-6, abs_tol=1e-9), (k, name)
    counts = reference_output_at_set(model, *data, horizon, stride)
    torch.testing.assert_close(scores[1]["output_at_set_per_channel"], counts, rtol=1e-6, atol=1e-9)
    assert 0 < counts[0] and counts[1] == counts[2] == 0  # right about channel 0, wrong about 1 and 2
    assert 0 < scores[1]["model_recall"] < 1 and scores[1]["model_false"] > 0


def test_a_perfect_model_scores_one_and_no_comparison_crosses_a_reset():
    tool = import_benchmark_tool("pdqn_model_quality")
    obs, actions, rewards, real = shift_game()
    scores = tool.compare(ShiftModel(), obs, actions, rewards, real, horizon=20, stride=1)
    for k, s in scores.items():
        # Comparing across a reset would meet an observation the model cannot predict.
        assert (s["model_accuracy"], s["model_recall"], s["model_false"]) == (1.0, 1.0, 0.0), k
        assert s["reward_error"] == s["reward_abs_error"] == 0.0
        assert s["unchanged_recall"] < 1.0  # channel 0 moves
    # Starts 0-10. Envs 0 and 3 never reset; a chain of env 1 from t0 reaches k = 12 - t0 (its reset is
    # step 12), one of env 2 k = 25 - t0.
    for k, s in scores.items():
        assert s["transitions"] == 2 * 11 + min(max(13 - k, 0), 11) + min(max(26 - k, 0), 11), k


def test_a_model_that_predicts_no_change_scores_as_the_baseline():
    tool = import_benchmark_tool("pdqn_model_quality")

    class Unchanged(torch.nn.Module):
        def forward(self, obs, actions):
            return obs, torch.zeros(obs.shape[0]), torch.zeros(obs.shape[0])

    scores = tool.compare(Unchanged(), *shift_game(seed=2), horizon=10, stride=2)
    for s in scores.values():
        for name in ("accuracy", "recall", "false"):
            assert s[f"model_{name}"] == s[f"unchanged_{name}"]
        assert torch.equal(s["model_recall_per_channel"], s["unchanged_recall_per_channel"])
        assert s["model_recall_per_channel"][1:].eq(1.0).all()  # channels 1 and 2 do not move


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("model_quality")
    flags = "--num-envs 8 --num-steps 16 --num-minibatches 4 --eval-episodes 2 --no-cuda --total-timesteps 512"
    result = run_script("pdqn_minatar.py", *flags.split(), "--planning-delay-updates", "2", "--save-model", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return only_run_dir(cwd)


def tool(*flags, cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "name, heading", [("pdqn_minatar.pt", "MinAtar/Breakout-v1:"), ("checkpoint.pt", "MinAtar/Breakout-v1 at step 512:")]
)
def test_the_tool_reads_a_saved_model_or_a_checkpoint_and_prints_both_tables(saved_model, name, heading):
    result = tool(os.path.join(saved_model, name), "--num-envs", "4", "--steps", "40", "--horizon", "5", cwd=saved_model)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{heading} 4 envs x 40 steps")
    rows = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[:4] == ["k", "1", "2", "5"]
    assert rows[4:] == ["channel", "paddle", "ball", "trail", "brick"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["missing.pt"], "no checkpoint at missing.pt"),
        (
            ["not_a_model.pt"],
            "not_a_model.pt is not a pdqn_minatar.py checkpoint or saved model "
            "(formats pdqn_minatar/training_state/v3, pdqn_minatar/model/v2)",
        ),
        (["MODEL", "--epsilon", "nan"], "--epsilon must be in [0, 1], got nan"),
        (["MODEL", "--steps", "10", "--horizon", "20"], "--horizon (20) must be at most --steps (10)"),
        (["MODEL", "--num-envs", "0"], "--num-envs must be in [1, 1000000], got 0"),
        (["MODEL", "--seed", "-1"], "--seed must be in [0, 2**32 - 1], got -1"),
        (["MODEL", "--num-envs", "1000000", "--steps", "1000000"], "the played observations and the envs"),
        (["MODEL", "--num-envs", "x"], "argument --num-envs: invalid int value: 'x'"),
        (["MODEL", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_input_is_one_error_line(saved_model, tmp_path, monkeypatch, capsys, flags, message):
    (tmp_path / "not_a_model.pt").write_text("not a checkpoint")
    monkeypatch.chdir(tmp_path)
    flags = [os.path.join(saved_model, "pdqn_minatar.pt") if f == "MODEL" else f for f in flags]
    monkeypatch.setattr(sys, "argv", [TOOL, *flags])
    with pytest.raises(SystemExit) as exit_info:
        import_benchmark_tool("pdqn_model_quality").main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_bad_input_run_from_the_command_line_is_one_line(tmp_path):
    result = tool("missing.pt", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: no checkpoint at missing.pt\n" and not result.stdout


def test_a_model_saved_with_model_predicts_change_is_rebuilt_as_one(tmp_path, monkeypatch, capsys):
    # A change model whose cell head outputs zeros predicts "nothing moves": its scores are the baseline's.
    # Built as the authors' model, the same weights would predict empty observations (recall 0).
    torch.manual_seed(0)
    q_network, model = pdqn.make_networks(4, 3, model_predicts_change=True)
    torch.nn.init.zeros_(model.next_obs_head.weight)
    torch.nn.init.zeros_(model.next_obs_head.bias)
    args = pdqn.asdict(pdqn.Args(env_id="MinAtar/Breakout-v1", model_predicts_change=True))
    path = str(tmp_path / "change.pt")
    saved = {"format": pdqn.MODEL_FORMAT, "q_network": q_network.state_dict(), "world_model": model.state_dict()}
    torch.save(saved | {"args": args}, path)
    monkeypatch.setattr(sys, "argv", [TOOL, path, "--num-envs", "2", "--steps", "20", "--horizon", "2"])
    import_benchmark_tool("pdqn_model_quality").main()
    rows = [line.split("|")[3:11] for line in capsys.readouterr().out.splitlines() if line[:4] in ("| 1 ", "| 2 ")]
    assert len(rows) == 2
    for row in rows:
        model_cells, unchanged_cells = row[:3], row[5:8]
        assert model_cells == unchanged_cells and float(model_cells[1]) > 0.5


def test_a_model_saved_with_the_conv_cell_head_is_rebuilt_as_one(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    q_network, model = pdqn.make_networks(4, 3, model_cell_head="conv")
    args = pdqn.asdict(pdqn.Args(env_id="MinAtar/Breakout-v1", model_cell_head="conv"))
    path = str(tmp_path / "conv.pt")
    saved = {"format": pdqn.MODEL_FORMAT, "q_network": q_network.state_dict(), "world_model": model.state_dict()}
    torch.save(saved | {"args": args}, path)
    monkeypatch.setattr(sys, "argv", [TOOL, path, "--num-envs", "2", "--steps", "20", "--horizon", "2"])
    import_benchmark_tool("pdqn_model_quality").main()  # built with the linear head, the weights would not fit
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows == ["k", "1", "2", "channel", "paddle", "ball", "trail", "brick"]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"args": {"env_id": "MinAtar/Nope-v1"}}, "PATH: unknown MinAtar env id 'MinAtar/Nope-v1'; choose one of"),
        ({"args": {"max_episode_steps": 0}}, "PATH holds a max_episode_steps that pdqn_minatar.py does not accept: 0"),
        ({"args": {"sticky_action_prob": 2.0}}, "PATH holds a sticky_action_prob that pdqn_minatar.py does not accept: 2.0"),
        ({"args": {"model_cell_head": "big"}}, "PATH holds a model_cell_head that pdqn_minatar.py does not accept: 'big'"),
        ({"q_network": [1, 2]}, "PATH is not a pdqn_minatar.py checkpoint or saved model"),
        ({"world_model": {"torso.0.weight": torch.zeros(1)}}, "PATH does not fit the networks for MinAtar/Breakout-v1: "),
        ({"args": ["env_id"]}, "PATH is not a pdqn_minatar.py checkpoint or saved model"),
    ],
)
def test_a_saved_model_that_no_run_could_have_saved_is_one_error_line(tmp_path, monkeypatch, capsys, changes, message):
    q_network, model = pdqn.make_networks(4, 3)
    saved = {
        "format": pdqn.MODEL_FORMAT,
        "args": pdqn.asdict(pdqn.Args(env_id="MinAtar/Breakout-v1")),
        "q_network": q_network.state_dict(),
        "world_model": model.state_dict(),
    }
    for key, value in changes.items():  # settings go into the saved args; anything else replaces its entry
        saved[key] = saved[key] | value if key == "args" and isinstance(value, dict) else value
    path = str(tmp_path / "odd.pt")
    torch.save(saved, path)
    monkeypatch.setattr(sys, "argv", [TOOL, path, "--num-envs", "2", "--steps", "20", "--horizon", "2"])
    with pytest.raises(SystemExit) as exit_info:
        import_benchmark_tool("pdqn_model_quality").main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.replace('PATH', path)}") and err.count("\n") == 1
