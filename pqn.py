"""PQN (Gallici et al., "Simplifying Deep Temporal Difference Learning", ICLR 2025) on envpool's classic-control envs.

Reading guide: the algorithm is `main`'s loop (rollout -> Q(lambda) targets -> update epochs -> logging),
with `QNetwork` (LayerNorm instead of a target network), `q_lambda_returns`, `rollout` and `update`.
`--num-seeds` trains several agents at once: see the comment above `LinearPerAgent`.
"""

import collections
import contextlib
import hashlib
import importlib.util
import io
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import envpool
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment (of its first agent, with --num-seeds)"""
    num_seeds: int = 1
    """the number of agents trained at once, with seeds seed, seed + 1, ...: agent k trains as a lone run with seed
    seed + k would (its own initialisation, envs, exploration, minibatches, gradient clipping and optimizer state, all
    from its own random streams) and logs to its own run directory"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs `pip install -r requirements/wandb.txt` and an account)"""
    wandb_project_name: str = "pqn"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    save_model: bool = False
    """save each agent's Q-network and Args to runs/{run_name}/{exp_name}.pt (its own run directory) at the end and at an
    interrupt"""
    eval_checkpoint: str | None = None
    """evaluate this saved model (or every agent of this checkpoint.pt) greedily for `eval_episodes` episodes and exit,
    without training"""
    capture_video: bool = False
    """record env 0's greedy evaluation episode (the first agent's) at each evaluation as an MP4 in
    runs/{run_name}/videos/ (with --eval-checkpoint: in videos/ beside the checkpoint); needs pip install -r
    requirements/video.txt"""
    checkpoint_frequency: int | None = None
    """write the whole training state of all agents to checkpoint.pt in the first agent's run directory every this many env
    steps of each agent (default: every tenth of the run), at an interrupt and at the end"""
    resume: str | None = None
    """continue the run whose first agent's run directory (runs/{run_name}) holds this checkpoint.pt, with its Args; envs
    start afresh, so episodes in flight are lost"""

    env_id: str = "CartPole-v1"
    """the id of an envpool env with a flat Box observation and Discrete actions: CartPole-v1, Acrobot-v1, MountainCar-v0"""
    total_timesteps: int = 500_000
    """total environment steps of each agent, summed over its envs"""
    learning_rate: float = 2.5e-4
    """the learning rate of the RAdam optimizer"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    num_envs: int = 32
    """the number of parallel environments of each agent"""
    num_steps: int = 64
    """the number of steps each env runs per rollout"""
    num_minibatches: int = 16
    """the number of minibatches a rollout is split into"""
    update_epochs: int = 8
    """the number of passes over each rollout"""
    gamma: float = 0.99
    """the discount factor"""
    q_lambda: float = 0.65
    """the lambda of Peng's Q(lambda) targets"""
    start_e: float = 1.0
    """the starting epsilon of the epsilon-greedy behaviour policy"""
    end_e: float = 0.05
    """the final epsilon"""
    exploration_fraction: float = 0.5
    """the fraction of `total_timesteps` over which epsilon decays linearly to `end_e`"""
    max_grad_norm: float = 10.0
    """the maximum global norm of each agent's gradients (clipped to it before each RAdam step)"""
    eval_frequency: int = 0
    """evaluate the greedy policy every this many env steps (0: only at the end of training)"""
    eval_episodes: int = 10
    """the number of greedy evaluation episodes of each agent, one per env"""
    compile: bool = False
    """torch.compile the acting step and the gradient step, the latter as one graph with its backward pass and RAdam (costs
    start-up time)"""
    cudagraphs: bool = False
    """record the acting step, the Q(lambda) targets and the gradient step as CUDA graphs and replay them (GPU only; with
    --compile, Inductor kernels inside the graphs)"""

    # Computed from the above after parsing.
    batch_size: int = field(default=0, init=False)
    minibatch_size: int = field(default=0, init=False)
    num_iterations: int = field(default=0, init=False)


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# A lower bound on what one classic-control env takes in an envpool, for the memory check.
ENV_BYTES = 7 * 2**10
# A margin for the files a run holds open besides its agents' logs (envs, checkpoints, imports).
FILES_BESIDE_AGENTS = 256


def finalize_args(args: Args) -> Args:
    """Checks the flags and fills in the derived sizes."""
    check_finite(args)  # first: NaN passes every comparison below
    check_not_empty(args)
    positive = [
        "num_seeds",
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "eval_episodes",
        "learning_rate",
        "max_grad_norm",
    ]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.capture_video:
        check_video_support()
    if not 0 <= args.seed <= 2**32 - args.num_seeds:
        raise UsageError(
            f"--seed must be in [0, 2**32 - {args.num_seeds}] (agent k's seed, --seed + k, is a numpy seed: below 2**32), "
            f"got {args.seed}"
        )
    if not args.exp_name or "/" in args.exp_name or "\0" in args.exp_name:
        raise UsageError(f"--exp-name names the run folder and the saved model: it must be a file name, got {args.exp_name!r}")
    if args.checkpoint_frequency is not None and args.checkpoint_frequency <= 0:
        raise UsageError(f"--checkpoint-frequency must be positive, got {args.checkpoint_frequency}")
    if args.eval_frequency < 0:
        raise UsageError(f"--eval-frequency must be 0 (only at the end) or positive, got {args.eval_frequency}")
    for name in ["gamma", "q_lambda", "start_e", "end_e", "exploration_fraction"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.end_e > args.start_e:
        raise UsageError(f"--end-e {args.end_e} is above --start-e {args.start_e}: epsilon decays from --start-e to --end-e")
    if args.track and args.num_seeds > 1:
        raise UsageError(
            "--track logs one run per process; with --num-seeds, upload the agents' run directories afterwards with "
            "`wandb sync --sync-tensorboard runs/<run_name>`"
        )
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs wandb: pip install -r requirements/wandb.txt")
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise UsageError("--cudagraphs needs a CUDA GPU and none is available; on the CPU use --compile")
    args.batch_size = args.num_envs * args.num_steps
    if args.batch_size % args.num_minibatches != 0:
        raise UsageError(
            f"num_envs * num_steps = {args.batch_size} is not divisible by --num-minibatches {args.num_minibatches}"
        )
    if args.total_timesteps < args.batch_size:
        raise UsageError(
            f"--total-timesteps {args.total_timesteps} is smaller than one batch (num_envs * num_steps = {args.batch_size})"
        )
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // args.batch_size
    # Per step of the rollout (of every agent): observations (classic control has at most 6 floats; 8 allowed for),
    # action, max_q, next_q, reward, target, three flags; and as much again for the acting passes. With it, the
    # training and evaluation envs of every agent.
    num_envs = args.num_seeds * (args.num_envs + args.eval_episodes)
    check_memory(
        2 * args.num_seeds * args.batch_size * (4 * 8 + 8 + 4 * 4 + 3) + num_envs * ENV_BYTES,
        "the rollout and the envs (--num-envs and --eval-episodes of every agent)",
    )
    # Each agent keeps its TensorBoard file open (and a thread writing it).
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files != resource.RLIM_INFINITY and args.num_seeds + FILES_BESIDE_AGENTS > open_files:
        raise UsageError(
            f"--num-seeds {args.num_seeds} needs one open log file per agent and this process may open {open_files} "
            "files (ulimit -n); use fewer agents per process"
        )
    return args


# envpool makes its Box spaces, at every access, from float64 bounds; gymnasium warns at the cast to float32.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")


# --- shared: env_seeds ---
def env_seeds(seed: int, stream: str, num_envs: int, step: int = 0) -> list[int]:
    """One seed per env, each hashed from (run seed, stream, step) by numpy's SeedSequence, so the
    envs of one run share no seed with those of another run (`seed + i` would: seeds 1 and 2
    would share all envs but one) or of another stream ("training", "evaluation"). A resumed run
    passes the step it resumes from, so that its new envs do not replay the run's first episodes."""
    state = np.random.SeedSequence([seed, step, *stream.encode()]).generate_state(num_envs, dtype=np.uint64)
    return [int(s) for s in state % 2**31]  # envpool takes int32 seeds


# --- end shared: env_seeds ---


def make_envs(env_id: str, seeds: list[int], render: bool = False) -> gym.vector.VectorEnv:
    """envpool's vector env of `env_id`, one env per seed, checked for PQN's spaces.
    Its dynamics, spaces and time limits are gymnasium's, and like gymnasium's it auto-resets on
    the next step. envpool steps its envs in C++, where gymnasium steps Acrobot and MountainCar one
    env at a time in Python (the README's speed page measures both). One difference: an episode that
    terminates on its last allowed step comes back truncated and not terminated, so PQN bootstraps there."""
    if env_id not in envpool.list_all_envs():
        raise UsageError(
            f"cannot make env {env_id!r}: envpool has no such env (classic control: CartPole-v1, Acrobot-v1, MountainCar-v0)"
        )
    # One thread: a classic-control step takes microseconds, and threads of envpool's own would
    # compete with the learner for the cores.
    render_mode = "rgb_array" if render else None  # env 0's frames, for --capture-video
    envs = envpool.make_gymnasium(env_id, num_envs=len(seeds), seed=seeds, num_threads=1, render_mode=render_mode)
    if not isinstance(envs.single_action_space, gym.spaces.Discrete):
        envs.close()
        raise UsageError(f"{env_id} has action space {envs.single_action_space}; PQN needs a Discrete one")
    obs_space = envs.single_observation_space
    if not (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) == 1):
        envs.close()
        raise UsageError(f"{env_id} has observation space {obs_space}; this script needs a flat Box")
    return envs


# The agents of one run (--num-seeds S) are trained in the same tensors: every parameter has a leading
# agent axis of size S, and the layers below apply agent k's weights to agent k's inputs with batched
# matmuls, so that S agents cost about as many kernel launches as one. Agents share no parameter, and
# nothing below mixes the rows of two agents.
class LinearPerAgent(nn.Module):
    """S linear layers, one per agent: [S, B, in] -> [S, B, out]. Agent k's weights and biases are
    drawn as nn.Linear draws them (uniform in +-1/sqrt(in)), from agent k's own generator."""

    def __init__(self, in_features: int, out_features: int, generators: list[torch.Generator]):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(
            torch.stack([torch.empty(in_features, out_features).uniform_(-bound, bound, generator=g) for g in generators])
        )
        self.bias = nn.Parameter(
            torch.stack([torch.empty(1, out_features).uniform_(-bound, bound, generator=g) for g in generators])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class LayerNormPerAgent(nn.Module):
    """LayerNorm over the last dim with a gain and bias per agent: [S, B, size] -> [S, B, size]."""

    def __init__(self, num_agents: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_agents, 1, size))
        self.bias = nn.Parameter(torch.zeros(num_agents, 1, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, nn.functional.layer_norm(x, x.shape[-1:]), self.weight)


class QNetwork(nn.Module):
    """MLP with LayerNorm after every hidden layer: the normalisation that lets PQN drop the target
    network. One per agent, agent k's parameters drawn from `generators[k]` alone (so agent k of a
    run is initialised as the lone agent of a run with that seed)."""

    def __init__(
        self, observation_space: gym.spaces.Box, num_actions: int, generators: list[torch.Generator], hidden_size: int = 128
    ):
        super().__init__()
        self.num_agents = len(generators)
        # Observations are scaled to [-1, 1] by the bounds of their space where it has bounds:
        # MountainCar's velocity lives in [-0.07, 0.07] and would be all but invisible otherwise.
        # Spaces mark an unbounded dimension with inf or with float32's largest number.
        limit = np.finfo(np.float32).max
        bounded = (np.abs(observation_space.low) < limit) & (np.abs(observation_space.high) < limit)
        low = np.where(bounded, observation_space.low, -1.0)  # unbounded dimensions pass through as they are
        high = np.where(bounded, observation_space.high, 1.0)
        self.register_buffer("obs_center", torch.tensor((high + low) / 2, dtype=torch.float32))
        self.register_buffer("obs_scale", torch.tensor((high - low) / 2, dtype=torch.float32))
        self.network = nn.Sequential(
            LinearPerAgent(observation_space.shape[0], hidden_size, generators),
            LayerNormPerAgent(self.num_agents, hidden_size),
            nn.ReLU(),
            LinearPerAgent(hidden_size, hidden_size, generators),
            LayerNormPerAgent(self.num_agents, hidden_size),
            nn.ReLU(),
            LinearPerAgent(hidden_size, num_actions, generators),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Q-values of a batch laid out agent by agent: [S * B, obs] -> [S * B, actions], rows
        k * B ... k * B + B - 1 being agent k's (as its envs are in the vector env, see `main`)."""
        x = (x - self.obs_center) / self.obs_scale
        return self.network(x.view(self.num_agents, -1, x.shape[-1])).flatten(0, 1)

    def agent_state_dict(self, k: int) -> dict:
        """The state of agent k alone, as a one-agent QNetwork holds it."""
        parameters = dict(self.named_parameters())
        # Cloned: a slice would be saved with the whole tensor it views, every agent's weights.
        return {name: t[k : k + 1].clone() if name in parameters else t for name, t in self.state_dict().items()}


# --- shared: q_lambda_returns ---
def q_lambda_returns(rewards, terminations, truncations, next_q, gamma, q_lambda):
    """Peng's Q(lambda) targets, computed backwards over a rollout; all tensors are [T, N].

    next_q[t] = max_a Q(s_{t+1}, a), where s_{t+1} is what step t returned: the final observation
    when the episode ended at t. Termination cuts the bootstrap; truncation keeps it. At every
    episode end the lambda-trace is cut, so nothing after it (the reset step) leaks back.
    """
    # G[t] = r[t] + gamma (1 - term[t]) ((1 - done[t]) (lambda G[t+1] + (1 - lambda) next_q[t]) + done[t] next_q[t])
    # is linear in G[t+1]: G[t] = base[t] + trace[t] G[t+1]. Both parts are computed for all steps at
    # once, which leaves one operation per step in the backward loop. The rollout's end cuts the trace too.
    discount = gamma * (1.0 - terminations.float())
    cut = torch.logical_or(terminations.bool(), truncations.bool()).float()
    cut[-1] = 1.0
    base = rewards + discount * (1.0 - q_lambda * (1.0 - cut)) * next_q
    trace = discount * q_lambda * (1.0 - cut)
    for t in reversed(range(rewards.shape[0] - 1)):
        base[t] += trace[t] * base[t + 1]
    return base


# --- end shared: q_lambda_returns ---


# --- shared: linear_schedule ---
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    if duration <= 0:
        return end_e
    return max(end_e, start_e + (end_e - start_e) * t / duration)


# --- end shared: linear_schedule ---


@torch.no_grad()
def act(q_network, obs, epsilon, noise):
    """Epsilon-greedy actions, and max_a Q(obs, a): the value the step that returned obs bootstraps from
    (its next_q in the Q(lambda) targets).
    `epsilon` is a 0-d tensor, so a compiled `act` does not recompile as it decays. `noise` is [N, 2],
    uniform in [0, 1) and drawn from each agent's own generator (`draw_noise`): env i explores where
    noise[i, 0] < epsilon, with the action floor(noise[i, 1] * num_actions)."""
    q = q_network(obs)
    max_q, greedy = q.max(dim=1)
    random_actions = (noise[:, 1] * q.shape[1]).long().clamp(max=q.shape[1] - 1)
    return torch.where(noise[:, 0] < epsilon, random_actions, greedy), max_q


def draw_noise(generators: list[torch.Generator], num_envs: int, device: torch.device) -> torch.Tensor:
    """The uniform noise `act` explores with, agent by agent: [S * num_envs, 2], agent k's rows from
    its own generator, so that it explores as a lone run with its seed does. Drawn on the CPU, where
    the generators are, and then moved: a run explores alike on every device."""
    return torch.cat([torch.rand(num_envs, 2, generator=g) for g in generators]).to(device)


# --- shared: gym_rollout ---
class EpisodeStats:
    """Return and length of the episode each env is in, kept with array ops over all envs."""

    def __init__(self, num_envs):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def step(self, reward, done, is_reset):
        """Adds one step; returns (env indices, returns, lengths) of the episodes that ended with it.
        A reset step belongs to no episode: the counts restart there and its reward (0) is dropped."""
        self.returns = np.where(is_reset, 0.0, self.returns + reward)
        self.lengths = np.where(is_reset, 0, self.lengths + 1)
        return np.flatnonzero(done), self.returns[done], self.lengths[done]


def rollout(envs, policy, obs, is_reset, epsilon, num_steps, episode_stats):
    """Acts epsilon-greedily for `num_steps` steps in every env.

    `policy(obs, epsilon)` returns the actions and max_a Q(obs, a) (`act`). `obs` is what the
    first step acts on and `is_reset` (bool array) marks the envs where it is the final
    observation of an ended episode, so that step is a reset step (its action is ignored and its
    transition is not real). Returns the rollout as [T, N] tensors, `next_q` for the Q(lambda)
    targets, the observation and reset flags the next rollout starts from, and the episodes that
    ended, as (step index, env index, return, length).
    """
    device = obs.device
    num_envs = obs.shape[0]
    b = {
        "obs": torch.zeros((num_steps, *obs.shape), device=device),
        "actions": torch.zeros((num_steps, num_envs), dtype=torch.long, device=device),
        "max_q": torch.zeros((num_steps, num_envs), device=device),  # max_a Q(obs[t], a) while acting
    }
    # What the envs return stays on the host until the rollout ends: one transfer, not one per step.
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)
    terminations = np.zeros((num_steps, num_envs), dtype=bool)
    truncations = np.zeros((num_steps, num_envs), dtype=bool)
    resets = np.zeros((num_steps, num_envs), dtype=bool)
    episodes = []
    for step in range(num_steps):
        b["obs"][step] = obs
        resets[step] = is_reset
        action, max_q = policy(obs, epsilon)
        b["actions"][step], b["max_q"][step] = action, max_q
        next_obs, rewards[step], terminations[step], truncations[step], _ = envs.step(action.cpu().numpy())
        done = terminations[step] | truncations[step]
        episodes += [(step, *episode) for episode in zip(*episode_stats.step(rewards[step], done, is_reset))]
        obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
        is_reset = done

    # The value after the last step bootstraps the last targets; the other next_q come from acting.
    _, last_max_q = policy(obs, epsilon)
    b["next_q"] = torch.cat([b["max_q"][1:], last_max_q[None]])
    b["rewards"] = torch.as_tensor(rewards, device=device)
    b["terminations"] = torch.as_tensor(terminations, device=device)
    b["truncations"] = torch.as_tensor(truncations, device=device)
    b["is_reset"] = torch.as_tensor(resets, device=device)
    return b, obs, is_reset, episodes


# --- end shared: gym_rollout ---


# --- shared: radam ---
class RAdam:
    """RAdam (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020),
    the same numbers as torch.optim.RAdam with its defaults. Written out because torch.optim's
    step() always breaks a compiled graph: with this one, --compile fuses the whole gradient step.
    `lr` is a tensor, so that annealing it does not recompile the step. `static_state` is for
    --cudagraphs (see below)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps=1e-8, static_state=False):
        self.params = list(params)
        device = self.params[0].device
        self.lr = torch.tensor(lr, device=device)
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        # float64 like torch.optim's host-side step count: in float32, 1 - beta2**t loses digits early on.
        self.t = torch.zeros((), dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        # The step updates this state in place (and lr is changed in place between steps). A CUDA
        # graph is skipped when it mutates an input other than a parameter, unless the input is marked
        # as keeping its address (as torch.optim marks its state when compiled).
        if static_state:
            for state in [self.lr, self.t, *self.exp_avg, *self.exp_avg_sq]:
                torch._dynamo.mark_static_address(state)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"lr": self.lr, "t": self.t, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    @torch.no_grad()
    def load_state_dict(self, state: dict):
        """Copies in place: a compiled step keeps reading the tensors it was traced with."""
        for mine, saved in zip(
            [self.lr, self.t, *self.exp_avg, *self.exp_avg_sq],
            [state["lr"], state["t"], *state["exp_avg"], *state["exp_avg_sq"]],
            strict=True,
        ):
            mine.copy_(saved)

    @torch.no_grad()
    def step(self):
        self.t += 1
        beta1, beta2, t = self.beta1, self.beta2, self.t
        # rho: length of the simple moving average that the second moment approximates. While it is
        # at most 5 the variance of the adaptive rate is intractable, and the step is plain momentum SGD.
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        rectified = rho_t > 5
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(min=0).sqrt()
        step_size = (self.lr / (1 - beta1**t)).float()  # lr over the bias correction of the first moment
        rectified_step_size = (step_size * rect * (1 - beta2**t).sqrt()).float()
        for p, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step = torch.where(rectified, rectified_step_size / exp_avg_sq.sqrt().add_(self.eps), step_size)
            p.addcmul_(exp_avg, step, value=-1.0)


# --- end shared: radam ---


def td_loss(q_taken: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each agent's mean squared error over its real transitions (mask = 1), from [S, M] tensors to
    [S]; reset steps (mask = 0) add nothing."""
    return (mask * (q_taken - returns) ** 2).sum(1) / mask.sum(1).clamp(min=1.0)


@torch.no_grad()
def clip_grad_norm_per_agent(parameters, max_norm: float):
    """nn.utils.clip_grad_norm_ for each agent on its own: agent k's gradients are scaled by
    min(1, max_norm / (norm_k + 1e-6)), norm_k the global norm of agent k's gradients alone."""
    grads = [p.grad for p in parameters]
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()  # [S]
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))


def grad_step(q_network, optimizer, obs, actions, returns, mask, max_grad_norm):
    """One minibatch of TD regression to the Q(lambda) targets for every agent: the tensors are
    [S, M, ...], M transitions of each agent. Returns each agent's loss and mean Q of the actions
    taken, as [S] tensors (reading them out would wait for the device)."""
    q_taken = q_network(obs.flatten(0, 1)).gather(1, actions.reshape(-1, 1)).view(actions.shape)
    loss = td_loss(q_taken, returns, mask)
    optimizer.zero_grad()
    # Agents share no parameter, so the gradient of the sum is, for each agent, that of its own loss.
    loss.sum().backward()
    clip_grad_norm_per_agent(q_network.parameters(), max_grad_norm)
    optimizer.step()  # RAdam is elementwise: each agent's moments are its own
    return loss.detach(), (q_taken.detach() * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def update(train_step, b, returns, generators, update_epochs, minibatch_size):
    """`update_epochs` passes over the rollout, each agent's transitions in its own shuffled
    minibatches (shuffled by its own generator), given to `train_step(obs, actions, returns, mask)`
    (`grad_step`) as [S, M, ...] tensors. Returns each agent's mean TD loss and mean Q of the actions
    taken ([S] arrays)."""
    num_agents = len(generators)

    def by_agent(x):  # [T, S * N, ...] -> [S, T * N, ...]: row k holds agent k's transitions
        return x.unflatten(1, (num_agents, -1)).transpose(0, 1).flatten(1, 2)

    mask = by_agent(~b["is_reset"]).float()  # reset steps are not real transitions
    batch = [by_agent(b["obs"]), by_agent(b["actions"]), by_agent(returns), mask]
    agents = torch.arange(num_agents, device=mask.device)[:, None]
    losses, q_taken_means = [], []
    for _ in range(update_epochs):
        # One shuffle of each agent's rollout per epoch (a permutation per row); the minibatches are
        # consecutive slices of it.
        order = torch.stack([torch.randperm(mask.shape[1], generator=g) for g in generators]).to(mask.device)
        shuffled = [x[agents, order] for x in batch]
        for minibatch in zip(*[x.split(minibatch_size, dim=1) for x in shuffled]):
            loss, q_taken_mean = train_step(*minibatch)
            losses.append(loss)
            q_taken_means.append(q_taken_mean)
    return torch.stack(losses).mean(0).cpu().numpy(), torch.stack(q_taken_means).mean(0).cpu().numpy()


# --- shared: gym_evaluate ---
def evaluate(q_network, envs, seeds: list[int] | None, record=None) -> np.ndarray:
    """Returns of one greedy episode per env (one each, so short episodes are not over-counted).
    `seeds` seed the reset, one per env; None where the envs were seeded when made (envpool ignores them).
    `record()`, if given, is called at every frame of env 0's episode (after the reset and each step)."""
    device = next(q_network.parameters()).device
    obs, _ = envs.reset(seed=seeds)
    returns = np.zeros(envs.num_envs)
    finished = np.zeros(envs.num_envs, dtype=bool)
    if record:
        record()
    while not finished.all():
        with torch.no_grad():
            actions = q_network(torch.as_tensor(obs, dtype=torch.float32, device=device)).argmax(dim=1)
        obs, reward, terminated, truncated, _ = envs.step(actions.cpu().numpy())
        if record and not finished[0]:
            record()
        returns += np.where(finished, 0.0, reward)
        finished |= terminated | truncated
    return returns


# --- end shared: gym_evaluate ---


# --- shared: accelerate ---
def accelerate(fn, *, compile: bool, cudagraphs: bool):
    """The fast path. --compile: torch.compile turns `fn` into fused Inductor kernels; --cudagraphs:
    its kernels are recorded once as CUDA graphs and replayed, without a launch per kernel; both:
    Inductor kernels inside CUDA graphs. Neither changes what `fn` computes."""
    if not (compile or cudagraphs):
        return fn  # the plain path does not import Dynamo, whose import slows down every start
    # Lets backward() into a compiled graph, so that forward, backward and the optimizer fuse into one.
    torch._dynamo.config.trace_autograd_ops = True
    if not cudagraphs:
        return torch.compile(fn)
    graphed = torch.compile(fn, mode="reduce-overhead") if compile else torch.compile(fn, backend="cudagraphs")

    def copies(x):
        return x.clone() if isinstance(x, torch.Tensor) else type(x)(copies(v) for v in x)

    # A replay reuses the memory of the previous replay's outputs, so callers get copies.
    return lambda *args: copies(graphed(*args))


# --- end shared: accelerate ---


# --- shared: video ---
def check_video_support():
    """--capture-video needs imageio and its ffmpeg plugin: their absence is one line before training."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise UsageError(
            "--capture-video needs imageio and its ffmpeg plugin: pip install -r requirements/video.txt"
        ) from None


class VideoRecorder:
    """Called at each frame of an evaluation episode, keeps what `render()` returns (env 0's frame,
    [H, W, 3] uint8); `save` writes the frames as an H.264 MP4 with imageio's ffmpeg plugin."""

    def __init__(self, render, fps: int):
        self.render, self.fps, self.frames = render, fps, []

    def __call__(self):
        self.frames.append(self.render())

    def save(self, path: str):
        import imageio.v2 as imageio

        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with imageio.get_writer(path, fps=self.fps, macro_block_size=1) as writer:
                for frame in self.frames:
                    writer.append_data(frame)
        except OSError as e:
            raise RunFault(f"cannot write {path}: {e}") from None
        self.frames = []


# --- end shared: video ---


# --- shared: progress ---
class Progress:
    """One status line: redrawn in place on a terminal, else printed at every tenth of the run.
    The ETA assumes the rest of the run goes at the rate since this object was made (a resumed run's
    rate counts from its resumption)."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total_steps, self.start_step = total_steps, start_step
        self.start_time = time.time()
        self.tty = sys.stdout.isatty()
        self.last_draw = 0.0
        self.next_tenth = 1

    @staticmethod
    def clock(seconds: float) -> str:
        seconds = int(seconds)
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

    def update(self, step: int, sps: float, recent: str):
        """`recent`: what the run's recent episodes say, e.g. "return(last 20 ep) 12.30"."""
        elapsed = time.time() - self.start_time
        eta = elapsed * (self.total_steps - step) / max(step - self.start_step, 1)
        line = (
            f"step {step:>10,}/{self.total_steps:,} ({100 * step / self.total_steps:5.1f}%)  SPS {sps:>7,.0f}  {recent}"
            f"  elapsed {self.clock(elapsed)}  ETA {self.clock(eta)}"
        )
        if self.tty:
            if time.time() - self.last_draw > 0.2 or step >= self.total_steps:
                print("\r" + line, end="\n" if step >= self.total_steps else "", flush=True)
                self.last_draw = time.time()
        elif step * 10 >= self.next_tenth * self.total_steps:
            print(line, flush=True)
            self.next_tenth = step * 10 // self.total_steps + 1


def crossed(step: int, taken: int, every: int) -> bool:
    """Whether the last `taken` steps, which ended at `step`, reached a multiple of `every`: a periodic
    event (evaluation, checkpoint, target update) is due at whatever step a batch of steps passes it."""
    return step // every > (step - taken) // every


# --- end shared: progress ---


# --- shared: faults ---
class RunFault(Exception):
    """A fault during the run (a non-finite loss, an unwritable file): one line on stderr, exit status 1."""


def check_finite(args):
    """Every float flag must be a number: NaN passes every range check (`nan <= 0` is False)."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def check_not_empty(args):
    """A flag that is None unless given (a path, a name) must not be given empty: `--resume "$RUN"` with
    RUN unset would otherwise run as if the flag were left out."""
    for f in fields(args):
        if f.default is None and getattr(args, f.name) == "":
            raise UsageError(f"--{f.name.replace('_', '-')} is empty: give it a value or leave it out")


# A container's memory limit (cgroup v2, then v1): the machine's memory may be far more than a run may use.
CGROUP_MEMORY_LIMITS = ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"]


def memory_available() -> int:
    """Bytes a run may use: the machine's memory, or its container's limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():  # "max": no limit
            total = min(total, int(limit))
    return total


def check_memory(num_bytes: int, what: str):
    """Sizes that could never fit are one clear line before anything is allocated."""
    total = memory_available()
    if num_bytes > total:
        raise UsageError(
            f"{what} would take {num_bytes / 2**30:.1f} GiB and this machine lets it use {total / 2**30:.1f} GiB; "
            "use smaller sizes"
        )


def check_writable(directory: str):
    """A folder the run cannot write to is found before training, not when the model is saved."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {directory}: {e.strerror}") from None


def new_run_dirs(names: list[str]) -> list[str]:
    """Creates runs/{name}__{unix time} for each name, all with the same time stamp. A folder that
    exists already is another run's, of the same name and started in the same second (two scripts
    run side by side with the same --exp-name): then the next second is tried, so that no two runs
    write their logs and checkpoints into one folder."""
    while True:
        stamp = int(time.time())
        run_dirs, made = [f"runs/{name}__{stamp}" for name in names], []
        try:
            for run_dir in run_dirs:
                os.makedirs(run_dir)
                made.append(run_dir)
            return run_dirs
        except OSError as e:
            for made_dir in made:
                os.rmdir(made_dir)
            if not isinstance(e, FileExistsError):
                raise UsageError(f"cannot write to {run_dir}: {e.strerror}") from None
            time.sleep(1.0 - time.time() % 1.0)


def save_atomically(obj, path: str):
    """torch.save to a temporary file, then rename: a kill during the write leaves the previous file whole."""
    try:
        torch.save(obj, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        raise RunFault(f"cannot write {path}: {e.strerror}") from None


def flags_given(argv: list[str]) -> set[str]:
    """The names of the flags on the command line (`--max-grad-norm 5`, `--seed=2`, `--no-anneal-lr`)."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=")[0].replace("-", "_")
            names |= {name, name.removeprefix("no_")}
    return names


class Interrupts:
    """SIGINT and SIGTERM ask the run to stop at the end of the current iteration, where the script
    saves what it can and exits with 128 + the signal's number; a second signal stops it at once."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:
            print(f"{signal.Signals(signum).name} again: stopped at once, nothing saved", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum

    def status_at_the_end(self, run_dir):
        """The exit status of a run that finished: 0, or for a signal that came during its final
        evaluation or saves (they ran to the end), 128 + the signal's number and one line that says so."""
        if self.signal is None:
            return 0
        name = signal.Signals(self.signal).name
        print(f"{name} came after the last step: the run finished, its results are in {run_dir}", file=sys.stderr)
        return 128 + self.signal


def parse_args(args_class):
    """The command line parsed by tyro, whose reports of bad input (a value of the wrong type, an unknown
    flag or choice) are boxes of many lines: the box's message becomes one UsageError line."""
    report = io.StringIO()
    try:
        with contextlib.redirect_stderr(report):
            return tyro.cli(args_class)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        box, report = report.getvalue(), io.StringIO()  # told as one line instead
        message = []
        for line in box.splitlines()[1:]:  # below the box's title, up to its first rule
            text = line.strip("│╰╯ ")
            if not text or set(text) == {"─"}:
                break
            message.append(text)
        raise UsageError(" ".join(message) or box.strip()) from None
    finally:
        sys.stderr.write(report.getvalue())  # whatever else tyro wrote there


# --- end shared: faults ---


# --- shared: resume ---
# Flags a resumed run may change: where and how fast it runs, and where it logs; not what it computes.
RESUME_MAY_CHANGE = {
    "resume",
    "capture_video",
    "checkpoint_frequency",
    "checkpoint_buffers",
    "save_model",
    "cuda",
    "compile",
    "cudagraphs",
    "track",
    "wandb_project_name",
    "wandb_entity",
}


def resumed_args(args, given: set[str], saved: dict):
    """The Args of the run to resume (saved in its checkpoint), with the flags of RESUME_MAY_CHANGE
    given now. Any other flag given now must agree with the saved one."""
    resumed = type(args)(**{f.name: saved[f.name] for f in fields(args) if f.init})
    for name in sorted(given & set(saved)):
        if name in RESUME_MAY_CHANGE:
            setattr(resumed, name, getattr(args, name))
        elif getattr(args, name) != saved[name]:
            flag = f"--{name.replace('_', '-')}"
            raise UsageError(
                f"{flag} {getattr(args, name)} contradicts the resumed run's {flag} {saved[name]}; leave it out to resume"
            )
    return resumed


def rng_state() -> dict:
    """Python's, numpy's and torch's random states, in types that load with weights_only=True."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- end shared: resume ---


CHECKPOINT_FORMAT = "pqn/training_state/v4"
VIDEO_FPS = 50  # classic control's render rate


def agent_generators(seeds: list[int]) -> list[torch.Generator]:
    """Agent k's random stream, seeded by `seeds[k]` alone: it draws the agent's initial weights, then
    its exploration noise and minibatch order, in the order a lone run with that seed draws them."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def agents_env_seeds(seeds: list[int], stream: str, num_envs: int, step: int = 0) -> list[int]:
    """The env seeds of all agents, agent by agent: agent k's envs get the seeds a lone run with
    seed `seeds[k]` would give its envs."""
    return [env_seed for seed in seeds for env_seed in env_seeds(seed, stream, num_envs, step)]


def iqm(values) -> float:
    """Interquartile mean: the mean of what is left when a quarter (rounded down) is cut from each end."""
    values = np.sort(values)
    cut = len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def over_agents(values: np.ndarray) -> str:
    """One number per agent, said in a few characters: the number itself for one agent; else the IQM
    over the agents, with the range. Agents without a number yet (NaN) are left out."""
    if len(values) == 1:
        return f"{values[0]:8.2f}"
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return "     nan"
    return f"IQM {iqm(values):.2f} [{values.min():.2f}, {values.max():.2f}] of {len(values)} agents"


def load_model(path: str, device: torch.device) -> dict:
    """A `--save-model` file (one agent), or a run's checkpoint.pt (all its agents); both hold `q_network` and `args`."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}; write one with `python pqn.py --save-model`")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        # A training checkpoint names its diverged agents, {agent: env step}; a --save-model file has none.
        diverged = {int(k): int(step) for k, step in checkpoint.get("diverged", [])}
        return {"env_id": checkpoint["args"]["env_id"], "q_network": dict(checkpoint["q_network"]), "diverged": diverged}
    except Exception as e:
        raise UsageError(
            f"{path} is not a pqn.py checkpoint ({type(e).__name__}); write one with `python pqn.py --save-model`"
        ) from None


def load_training_state(run_dir: str) -> dict:
    """A run's checkpoint.pt, checked for every key that resuming reads. Loaded on the CPU whatever the
    device: resuming copies it into the run's own tensors, and random states must be CPU tensors."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(
            f"no checkpoint at {path}: --resume takes the run directory (runs/<run_name>) of a run that wrote one"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["format"] != CHECKPOINT_FORMAT:
            raise ValueError
        keys = "args run_names q_network optimizer iteration global_step recent_returns rng agent_rngs diverged finished"
        for key in keys.split():
            state[key]
        return state
    except Exception:
        raise UsageError(f"{path} is not a pqn.py training checkpoint (format {CHECKPOINT_FORMAT})") from None


def eval_checkpoint(args: Args, given: set[str], device: torch.device):
    """Evaluates every agent the file holds, agent k on the evaluation envs of seed `--seed` + k."""
    checkpoint = load_model(args.eval_checkpoint, device)
    env_id = checkpoint["env_id"]
    if "env_id" in given and args.env_id != env_id:
        raise UsageError(f"{args.eval_checkpoint} was trained on {env_id}, not {args.env_id}; leave --env-id out")
    if any(not isinstance(weight, torch.Tensor) or weight.numel() == 0 for weight in checkpoint["q_network"].values()):
        raise UsageError(f"{args.eval_checkpoint} holds empty weights: not a pqn.py model")
    first_weight = checkpoint["q_network"].get("network.0.weight")
    num_agents = first_weight.shape[0] if isinstance(first_weight, torch.Tensor) and first_weight.dim() == 3 else 1
    check_memory(num_agents * args.eval_episodes * ENV_BYTES, "the evaluation envs of the file's agents")
    seeds = [args.seed + k for k in range(num_agents)]
    envs = make_envs(env_id, agents_env_seeds(seeds, "evaluation", args.eval_episodes), render=args.capture_video)
    q_network = QNetwork(envs.single_observation_space, envs.single_action_space.n, agent_generators(seeds)).to(device)
    try:
        q_network.load_state_dict(checkpoint["q_network"])
    except (RuntimeError, TypeError) as e:  # weights of another shape, or not a state dict
        raise UsageError(f"{args.eval_checkpoint} does not fit the Q-network for {env_id}: {str(e).splitlines()[0]}") from None
    videos = os.path.join(os.path.dirname(args.eval_checkpoint), "videos")
    if args.capture_video:  # found before the evaluation, not when its video is saved
        check_writable(videos)
    video = VideoRecorder(lambda: envs.render()[0], VIDEO_FPS) if args.capture_video else None
    returns = evaluate(q_network, envs, seeds=None, record=video).reshape(num_agents, -1)  # [agent, episode]; seeded when made
    if video:
        name = os.path.splitext(os.path.basename(args.eval_checkpoint))[0]
        path = os.path.join(videos, f"{name}.mp4")
        video.save(path)
        print(f"video of the first agent's first episode: {path}")
    for k, agent_returns in enumerate(returns):
        agent = f" (agent {k} of {num_agents})" if num_agents > 1 else ""
        if k in checkpoint["diverged"]:  # its weights went on being updated with non-finite numbers
            print(f"{env_id}{agent}: not evaluated, it diverged at step {checkpoint['diverged'][k]} of its training")
            continue
        print(
            f"{env_id}{agent}: greedy return over {len(agent_returns)} episodes {agent_returns.mean():.2f} ± "
            f"{agent_returns.std():.2f}"
        )


def main(args: Args, given: set[str], state: dict | None = None):
    """Trains, or with --eval-checkpoint evaluates; `state` is the checkpoint of the run --resume continues."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    # Adam's first moment of a weight that gets no gradient (a dead ReLU unit) decays by 0.9 a step and
    # turns denormal after ~800 steps, and x86 CPUs compute on denormals many times slower. Flushed
    # to zero, nothing of size changes.
    torch.set_flush_denormal(True)
    if args.eval_checkpoint:
        return eval_checkpoint(args, given, device)

    total_steps = args.num_iterations * args.batch_size  # of each agent
    if state and state["finished"]:
        print(f"{args.resume} is finished (step {state['global_step']:,} of {total_steps:,}): nothing to resume")
        return
    seeds = [args.seed + k for k in range(args.num_seeds)]
    checkpoint_frequency = args.checkpoint_frequency or max(args.total_timesteps // 10, 1)
    interrupts = Interrupts()

    # The envs of all agents are one vector env, agent by agent: agent k's envs are envs
    # k * num_envs ... (k + 1) * num_envs - 1, so every [S * num_envs, ...] tensor of the rollout is
    # agent-major, as QNetwork reads its input. Envs cannot be saved: a resumed run makes them afresh,
    # seeded from the agents' seeds and the step it resumes from, so that it does not play the run's
    # first episodes again.
    resume_step = state["global_step"] if state else 0
    envs = make_envs(args.env_id, agents_env_seeds(seeds, "training", args.num_envs, resume_step))
    eval_envs = make_envs(
        args.env_id, agents_env_seeds(seeds, "evaluation", args.eval_episodes, resume_step), render=args.capture_video
    )
    video = VideoRecorder(lambda: eval_envs.render()[0], VIDEO_FPS) if args.capture_video else None
    # Agent k has seed `seed + k` and a run directory of its own, named as a lone run with that seed
    # names its directory; the checkpoint of all agents goes into the first agent's. A resumed run
    # continues in the directory given (moved or renamed as it may be), the other agents' beside it.
    if state:
        first = os.path.normpath(args.resume)
        run_dirs = [first] + [os.path.join(os.path.dirname(first), name) for name in state["run_names"][1:]]
    else:
        run_dirs = new_run_dirs([f"{args.env_id}__{args.exp_name}__{seed}" for seed in seeds])
    for run_dir in run_dirs:
        check_writable(run_dir)
    checkpoint_path = os.path.join(run_dirs[0], "checkpoint.pt")
    if args.track:
        import wandb

        run_name = os.path.basename(os.path.normpath(run_dirs[0]))
        try:
            wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                sync_tensorboard=True,
                config=asdict(args),
                name=run_name,
                # An id from the run's folder name: --resume continues the same wandb run.
                id=hashlib.sha1(run_name.encode()).hexdigest(),
                resume="allow",
                save_code=True,
            )
        except Exception as e:  # wandb's own failures: not logged in, no network, ...
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise RunFault(f"--track: wandb could not start the run: {reason}") from None
    # A resumed run writes on from its checkpoint's step: what the interrupted run logged after it is purged.
    writers = [SummaryWriter(run_dir, purge_step=state["global_step"] + 1 if state else None) for run_dir in run_dirs]
    if not state:
        for seed, writer in zip(seeds, writers):
            hyperparameters = {**asdict(args), "seed": seed}
            writer.add_text(
                "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in hyperparameters.items())
            )

    generators = agent_generators(seeds)
    q_network = QNetwork(envs.single_observation_space, envs.single_action_space.n, generators).to(device)
    optimizer = RAdam(q_network.parameters(), lr=args.learning_rate, static_state=args.cudagraphs)
    recent_returns = [collections.deque(maxlen=20) for _ in seeds]
    # Agent k -> the step at which its TD loss or mean Q was not finite. A lone run stops there; one agent
    # of several stops logging and saving there (its weights are not finite) while the others go on.
    diverged = {}
    start_iteration, global_step = 0, 0  # global_step: env steps of each agent
    if state:
        q_network.load_state_dict(state["q_network"])
        optimizer.load_state_dict(state["optimizer"])
        for recent, saved in zip(recent_returns, state["recent_returns"], strict=True):
            recent.extend(saved)
        start_iteration, global_step = state["iteration"], state["global_step"]
        diverged = dict(state["diverged"])
        set_rng_state(state["rng"])
        for generator, saved in zip(generators, state["agent_rngs"], strict=True):
            generator.set_state(saved)
    fast_act = accelerate(
        lambda obs, epsilon, noise: act(q_network, obs, epsilon, noise), compile=args.compile, cudagraphs=args.cudagraphs
    )

    def policy(obs, epsilon):
        return fast_act(obs, epsilon, draw_noise(generators, args.num_envs, device))

    # Inductor would compile the loop over the rollout's steps for a long time, to save little; a
    # CUDA graph of it (no Inductor) saves a kernel launch per step on the GPU.
    targets = accelerate(
        lambda *rollout: q_lambda_returns(*rollout, args.gamma, args.q_lambda), compile=False, cudagraphs=args.cudagraphs
    )
    train_step = accelerate(
        lambda *minibatch: grad_step(q_network, optimizer, *minibatch, args.max_grad_norm),
        compile=args.compile,
        cudagraphs=args.cudagraphs,
    )

    def run_evaluation(global_step):
        returns = evaluate(q_network, eval_envs, seeds=None, record=video).reshape(args.num_seeds, -1)  # [agent, episode]
        if video:  # env 0 is the first agent's
            video.save(os.path.join(run_dirs[0], "videos", f"eval_{global_step}.mp4"))
        returns[list(diverged)] = math.nan
        for k in live_agents():
            writers[k].add_scalar("eval/episodic_return", returns[k].mean(), global_step)
        if args.num_seeds == 1:
            print(
                f"eval at step {global_step}: greedy return {returns.mean():.2f} ± {returns.std():.2f} ({returns.size} "
                "episodes)",
                flush=True,
            )
        else:
            print(
                f"eval at step {global_step}: greedy return {over_agents(returns.mean(1))} ({args.eval_episodes} "
                "episodes each)",
                flush=True,
            )

    def save_checkpoint(iteration, finished=False):
        # What was logged up to the checkpoint reaches the disk first: a run killed after it resumes from it.
        for writer in writers:
            writer.flush()
        save_atomically(
            {
                "format": CHECKPOINT_FORMAT,
                "args": asdict(args),
                "run_names": [os.path.basename(run_dir) for run_dir in run_dirs],
                "q_network": q_network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "global_step": global_step,
                "recent_returns": [[float(r) for r in recent] for recent in recent_returns],
                "rng": rng_state(),
                "agent_rngs": [generator.get_state() for generator in generators],
                "diverged": [[k, step] for k, step in diverged.items()],
                # Only after the final evaluation: a run stopped in its last iteration still owes it.
                "finished": finished,
            },
            checkpoint_path,
        )

    def live_agents():
        return [k for k in range(args.num_seeds) if k not in diverged]

    def save_models():
        """Each agent's Q-network, as a lone run with its seed would save it (none for a diverged agent)."""
        for k in live_agents():
            path = os.path.join(run_dirs[k], f"{args.exp_name}.pt")
            save_atomically(
                {"q_network": q_network.agent_state_dict(k), "args": {**asdict(args), "seed": seeds[k], "num_seeds": 1}},
                path,
            )
        print(
            f"model saved to {path}"
            if args.num_seeds == 1
            else f"{len(live_agents())} models saved, one in each agent's run directory"
        )

    obs, _ = envs.reset()  # seeded when made
    obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
    is_reset = np.zeros(envs.num_envs, dtype=bool)
    episode_stats = EpisodeStats(envs.num_envs)
    progress = Progress(total_steps, start_step=global_step)
    start_step, start_time = global_step, time.time()
    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            # Rollout: num_steps epsilon-greedy steps in every env of every agent.
            lr = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations) if args.anneal_lr else args.learning_rate
            optimizer.lr.fill_(lr)  # in place: a compiled step reads this very tensor
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps, global_step)
            b, obs, is_reset, episodes = rollout(
                envs, policy, obs, is_reset, torch.tensor(epsilon, device=device), args.num_steps, episode_stats
            )
            for step, env, episodic_return, episodic_length in episodes:
                agent = env // args.num_envs
                if agent in diverged:
                    continue
                writers[agent].add_scalar("charts/episodic_return", episodic_return, global_step + (step + 1) * args.num_envs)
                writers[agent].add_scalar("charts/episodic_length", episodic_length, global_step + (step + 1) * args.num_envs)
                recent_returns[agent].append(episodic_return)
            global_step += args.batch_size

            # Targets, then update_epochs passes of minibatch TD regression on them.
            returns = targets(b["rewards"], b["terminations"], b["truncations"], b["next_q"])
            td_losses, q_values = update(train_step, b, returns, generators, args.update_epochs, args.minibatch_size)
            for k in np.flatnonzero(~(np.isfinite(td_losses) & np.isfinite(q_values))).tolist():
                if k in diverged:
                    continue
                diverged[k] = global_step
                message = f"the TD loss or mean Q of the agent with seed {seeds[k]} is not finite at step {global_step:,}"
                if len(diverged) == args.num_seeds:
                    last = (
                        f"the last checkpoint is {checkpoint_path}"
                        if os.path.isfile(checkpoint_path)
                        else "no checkpoint was written"
                    )
                    raise RunFault(f"{message}; {last}")
                print(f"{message}: that agent stops, the others go on", file=sys.stderr, flush=True)

            # Logging: each agent to its own run directory.
            sps = (global_step - start_step) / (time.time() - start_time)  # env steps per second of each agent
            for k in live_agents():
                writers[k].add_scalar("losses/td_loss", td_losses[k], global_step)
                writers[k].add_scalar("losses/q_values", q_values[k], global_step)
                writers[k].add_scalar("charts/learning_rate", lr, global_step)
                writers[k].add_scalar("charts/epsilon", epsilon, global_step)
                writers[k].add_scalar("charts/SPS", sps, global_step)
            recent = np.array([np.mean(r) if r and k not in diverged else math.nan for k, r in enumerate(recent_returns)])
            # The progress line's SPS counts the env steps of all agents.
            progress.update(global_step, sps * args.num_seeds, f"return(last 20 ep) {over_agents(recent)}")
            # Evaluation and checkpoint, each on its schedule (the last ones follow the loop).
            if iteration < args.num_iterations:
                if args.eval_frequency and crossed(global_step, args.batch_size, args.eval_frequency):
                    run_evaluation(global_step)
                if crossed(global_step, args.batch_size, checkpoint_frequency):
                    save_checkpoint(iteration)
            # An interrupt (Ctrl-C, SIGTERM): stop here with a checkpoint.
            if interrupts.signal:
                save_checkpoint(iteration)
                if args.save_model:
                    save_models()
                name = signal.Signals(interrupts.signal).name
                print(
                    f"{name}: stopped at step {global_step:,}; continue with `python pqn.py --resume {run_dirs[0]}`",
                    file=sys.stderr,
                )
                return 128 + interrupts.signal

        # The end: the final evaluation, the saved model and the finished run's checkpoint.
        run_evaluation(global_step)
        if args.save_model:
            save_models()
        save_checkpoint(args.num_iterations, finished=True)
        status = interrupts.status_at_the_end(run_dirs[0])
        if diverged:
            raise RunFault(
                f"{len(diverged)} of {args.num_seeds} agents diverged (seeds {', '.join(str(seeds[k]) for k in diverged)}: "
                f"their logs stop at the step named above); the others finished, their results are in "
                f"{os.path.dirname(run_dirs[0]) or '.'}"
            )
        return status
    finally:
        envs.close()
        eval_envs.close()
        for writer in writers:
            writer.close()


if __name__ == "__main__":
    try:
        args = parse_args(Args)
        given = flags_given(sys.argv[1:])
        state = load_training_state(args.resume) if args.resume else None
        if state:
            try:
                args = resumed_args(args, given, state["args"])
            except (KeyError, TypeError):
                raise UsageError(f"{args.resume}/checkpoint.pt is not a pqn.py training checkpoint") from None
        sys.exit(main(finalize_args(args), given, state))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFault as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except torch.OutOfMemoryError as e:  # the GPU's memory, which the check of the host's before training does not see
        print(f"error: out of GPU memory: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before training began (training answers it itself) or in --eval-checkpoint
        print("SIGINT: stopped, nothing saved", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
