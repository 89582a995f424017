"""How close are PDQN's imagined steps to the real game? A saved world model against the real envs.

    python benchmark/pdqn_model_quality.py runs/<run>/checkpoint.pt     # or a --save-model file

Plays `--num-envs` envs of the checkpoint's game for `--steps` steps with its Q-network, epsilon-greedy
(`--epsilon`), then, from every `--stride`-th step of each env, rolls the world model up to `--horizon`
steps ahead as planning does (`imagined_step`: cells and terminations thresholded at 0.5), but with the
actions the real env took, and compares each imagined observation with the real one. A comparison
stops where the real episode ended (the step after an end is a reset, not a transition). Prints a
table per horizon k: the share of cells right, the recall (of the cells set in the real observation,
the share the model sets), the false cells (cells the model sets that are not set, per set cell of
the real observation) and the mean and mean absolute error of the predicted reward; beside them, the
same cell scores for "nothing moves", the observation k steps earlier taken as the prediction. A model
worth planning with beats that baseline. Then per channel (MinAtar's names): the set cells per
observation, the cell head's mean output before the threshold at the set cells one step ahead, and the
recalls at k = 1 and k = horizon.
"""

import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from run import Parser, fail  # noqa: E402

import pdqn_minatar as pdqn  # noqa: E402

HORIZONS = (1, 2, 5, 10, 20)
# The settings of the run that make its envs and networks, each with the values pdqn_minatar.py accepts for it.
SETTINGS = {
    "env_id": lambda v: isinstance(v, str),
    "sticky_action_prob": lambda v: isinstance(v, (int, float)) and 0.0 <= v <= 1.0,
    "max_episode_steps": lambda v: isinstance(v, int) and v > 0,
    "model_predicts_change": lambda v: isinstance(v, bool),
    "model_cell_head": lambda v: v in ("linear", "conv"),
}


def play(q_network, envs, steps, epsilon, seed):
    """`steps` steps of the envs with epsilon-greedy actions. Returns obs [T + 1, N, C, H, W] (obs[t + 1]
    is what step t returned: the final observation when it ended an episode), actions and rewards
    [T, N], and `real` [T, N], False for the steps that only reset an env."""
    obs, _ = envs.reset(seed=pdqn.env_seeds(seed, "model quality", envs.num_envs))
    observations, actions, rewards, real = [torch.tensor(obs)], [], [], []
    ended = np.zeros(envs.num_envs, dtype=bool)
    for _ in range(steps):
        action, _ = pdqn.act(q_network, observations[-1], torch.tensor(epsilon))
        obs, reward, terminated, truncated, _ = envs.step(action.numpy())
        observations.append(torch.tensor(obs))
        actions.append(action)
        rewards.append(torch.tensor(reward, dtype=torch.float32))
        real.append(torch.tensor(~ended))
        ended = terminated | truncated
    return torch.stack(observations), torch.stack(actions), torch.stack(rewards), torch.stack(real)


@torch.no_grad()
def compare(model, obs, actions, rewards, real, horizon, stride):
    """From every `stride`-th step t0, the model rolled k = 1 ... horizon steps with the real actions,
    against obs[t0 + k], over the envs whose transitions t0 ... t0 + k - 1 are all real. Returns
    {k: scores} for the k with at least one such env; cell scores are pooled over all compared cells.
    For k = 1 also the mean output of the cell head, before the threshold, at the cells that are set."""
    sums = {}
    for t0 in range(0, actions.shape[0] - horizon + 1, stride):
        imagined, valid = obs[t0], torch.ones(obs.shape[1], dtype=torch.bool)
        for k in range(1, horizon + 1):
            valid = valid & real[t0 + k - 1]
            imagined, reward, _ = pdqn.imagined_step(model, imagined, actions[t0 + k - 1])
            if not valid.any():
                break
            target, unchanged = obs[t0 + k][valid], obs[t0][valid]
            s = sums.setdefault(k, empty_sums())
            s["transitions"] += int(valid.sum())
            s["cells"] += target.numel()
            s["reward_error"] += float((reward[valid] - rewards[t0 + k - 1][valid]).sum())
            s["reward_abs_error"] += float((reward[valid] - rewards[t0 + k - 1][valid]).abs().sum())
            s["set_per_channel"] += target.sum((0, 2, 3))
            if k == 1:  # the cell head's output before the threshold, at the cells that are set
                s["output_at_set_per_channel"] += (model(obs[t0], actions[t0])[0][valid] * target).sum((0, 2, 3))
            for name, prediction in [("model", imagined[valid]), ("unchanged", unchanged)]:
                s[f"{name}_right"] += float((prediction == target).sum())
                s[f"{name}_hits_per_channel"] += (prediction * target).sum((0, 2, 3))
                s[f"{name}_false_per_channel"] += (prediction * (1 - target)).sum((0, 2, 3))
    scores = {}
    for k, s in sums.items():
        scores[k] = {"transitions": s["transitions"], "set_per_channel": s["set_per_channel"] / s["transitions"]}
        set_cells = s["set_per_channel"].sum().clamp(min=1.0)
        for name in ("model", "unchanged"):
            scores[k][f"{name}_accuracy"] = s[f"{name}_right"] / s["cells"]
            scores[k][f"{name}_recall"] = float(s[f"{name}_hits_per_channel"].sum() / set_cells)
            scores[k][f"{name}_false"] = float(s[f"{name}_false_per_channel"].sum() / set_cells)
            scores[k][f"{name}_recall_per_channel"] = s[f"{name}_hits_per_channel"] / s["set_per_channel"].clamp(min=1.0)
        if k == 1:
            scores[k]["output_at_set_per_channel"] = s["output_at_set_per_channel"] / s["set_per_channel"].clamp(min=1.0)
        scores[k]["reward_error"] = s["reward_error"] / s["transitions"]
        scores[k]["reward_abs_error"] = s["reward_abs_error"] / s["transitions"]
    return scores


def empty_sums():
    sums = dict.fromkeys("transitions cells reward_error reward_abs_error model_right unchanged_right".split(), 0)
    for name in "set output_at_set model_hits model_false unchanged_hits unchanged_false".split():
        sums[f"{name}_per_channel"] = 0.0  # becomes a [C] tensor
    return sums


def load(path):
    """The Args, Q-network and world-model weights of a pdqn_minatar.py checkpoint or saved model."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["format"] not in (pdqn.MODEL_FORMAT, pdqn.CHECKPOINT_FORMAT) or not isinstance(saved["args"], dict):
            raise ValueError
        return saved["args"], dict(saved["q_network"]), dict(saved["world_model"]), saved.get("global_step")
    except Exception:
        fail(
            f"{path} is not a pdqn_minatar.py checkpoint or saved model "
            f"(formats {pdqn.CHECKPOINT_FORMAT}, {pdqn.MODEL_FORMAT})"
        )


def run_args(path, saved_args):
    """The pdqn.Args that make the envs and networks as the run made them, from the settings it saved."""
    for name, valid in SETTINGS.items():
        if name in saved_args and not valid(saved_args[name]):
            fail(f"{path} holds a {name} that pdqn_minatar.py does not accept: {saved_args[name]!r}")
    return pdqn.Args(**{name: saved_args[name] for name in SETTINGS if name in saved_args})


def main():
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a run's checkpoint.pt or a pdqn_minatar.py --save-model file")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="real steps per env")
    parser.add_argument("--stride", type=int, default=10, help="a comparison starts every this many steps")
    parser.add_argument("--horizon", type=int, default=20, help="imagined steps per comparison (planning's default)")
    parser.add_argument("--epsilon", type=float, default=0.05, help="of the real envs' actions (the final epsilon)")
    parser.add_argument("--seed", type=int, default=1)
    cli = parser.parse_args()
    for name in ("num_envs", "steps", "stride", "horizon"):
        if not 1 <= getattr(cli, name) <= 10**6:
            fail(f"--{name.replace('_', '-')} must be in [1, 1000000], got {getattr(cli, name)}")
    if cli.horizon > cli.steps:
        fail(f"--horizon ({cli.horizon}) must be at most --steps ({cli.steps})")
    if not 0.0 <= cli.epsilon <= 1.0:  # NaN fails too
        fail(f"--epsilon must be in [0, 1], got {cli.epsilon}")
    if not 0 <= cli.seed < 2**32:
        fail(f"--seed must be in [0, 2**32 - 1], got {cli.seed}")
    # Every real observation is kept (at most 10 channels of 10x10 floats), with the envs (made in this process,
    # as pdqn_minatar.py's default --vectorization sync makes them).
    try:
        pdqn.check_memory(
            (cli.steps + 1) * cli.num_envs * 4 * 10 * 10 * 10 + cli.num_envs * pdqn.ENV_BYTES["sync"],
            "the played observations and the envs (--steps and --num-envs)",
        )
    except pdqn.UsageError as e:
        fail(str(e))
    saved_args, q_state, model_state, step = load(cli.checkpoint)
    args = run_args(cli.checkpoint, saved_args)
    torch.manual_seed(cli.seed)
    try:
        envs = pdqn.make_envs(args, cli.num_envs)
    except pdqn.UsageError as e:  # an env id this MinAtar does not have
        fail(f"{cli.checkpoint}: {e}")
    q_network, model = pdqn.make_networks(
        envs.single_observation_space.shape[0],
        int(envs.single_action_space.n),
        args.model_predicts_change,
        args.model_cell_head,
    )
    try:
        q_network.load_state_dict(q_state)
        model.load_state_dict(model_state)
    except (RuntimeError, AttributeError) as e:  # other sizes, or keys that are not names (not strings)
        fail(f"{cli.checkpoint} does not fit the networks for {args.env_id}: {str(e).splitlines()[0]}")
    obs, actions, rewards, real = play(q_network, envs, cli.steps, cli.epsilon, cli.seed)
    envs.close()
    scores = compare(model, obs, actions, rewards, real, cli.horizon, cli.stride)

    at = f" at step {step:,}" if step is not None else ""
    print(f"{args.env_id}{at}: {cli.num_envs} envs x {cli.steps} steps, epsilon {cli.epsilon}, {cli.checkpoint}")
    print(
        f"real reward per step {rewards[real].mean():.3f}, set cells per observation {obs[1:][real].sum((1, 2, 3)).mean():.1f}"
    )
    print()
    print(
        "| k | transitions | cells right | recall | false cells | reward error | abs reward error "
        "| unchanged: cells right | recall | false cells |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in sorted({k for k in HORIZONS if k < cli.horizon} | {cli.horizon}):
        if k not in scores:  # no comparison reached k steps without an episode end
            continue
        s = scores[k]
        print(
            f"| {k} | {s['transitions']:,} | {s['model_accuracy']:.3f} | {s['model_recall']:.3f} | "
            f"{s['model_false']:.3f} | {s['reward_error']:+.3f} | {s['reward_abs_error']:.3f} | "
            f"{s['unchanged_accuracy']:.3f} | {s['unchanged_recall']:.3f} | {s['unchanged_false']:.3f} |"
        )
    print()
    ks = [k for k in sorted({1, cli.horizon}) if k in scores]
    print(
        "| channel | set cells per observation | output at set cells k=1 | "
        + " | ".join(f"recall k={k} | unchanged k={k}" for k in ks)
        + " |"
    )
    print("|---|---|---|" + "---|---|" * len(ks))
    for c, name in enumerate(channel_names(args.env_id, obs.shape[2])):
        row = [f"{scores[k][f'{n}_recall_per_channel'][c]:.3f}" for k in ks for n in ("model", "unchanged")]
        first = scores[1]
        print(
            f"| {name} | {first['set_per_channel'][c]:.2f} | {first['output_at_set_per_channel'][c]:.3f} | "
            + " | ".join(row)
            + " |"
        )


def channel_names(env_id, channels):
    """The game's names of its observation channels (MinAtar's own), or their numbers."""
    try:
        names = sorted(gym.make(env_id).unwrapped.game.env.channels.items(), key=lambda item: item[1])
        if len(names) == channels:
            return [name for name, _ in names]
    except AttributeError:
        pass
    return [f"channel {c}" for c in range(channels)]


if __name__ == "__main__":
    main()
