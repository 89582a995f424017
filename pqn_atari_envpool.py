"""PQN (Gallici et al., "Simplifying Deep Temporal Difference Learning", ICLR 2025) on Atari through envpool.

Reading guide: the algorithm is `main`'s loop (rollout -> Q(lambda) targets -> update epochs -> logging),
with `QNetwork` (Nature CNN with LayerNorm, no target network), `q_lambda_returns`, `rollout` and `update`.
"""

import collections
import contextlib
import hashlib
import importlib.util
import io
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields

import envpool
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
    """seed of the experiment"""
    torch_deterministic: bool = True
    """make cuDNN use deterministic convolution algorithms (torch.backends.cudnn.deterministic); other GPU
    kernels may still vary"""
    cuda: bool = True
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs `pip install -r requirements/wandb.txt` and an account)"""
    wandb_project_name: str = "pqn"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    save_model: bool = False
    """save the Q-network and these Args (the QDagger teacher format) to runs/{run_name}/{exp_name}.pt at the end and at an
    interrupt"""
    eval_checkpoint: str | None = None
    """evaluate this saved model (or a run's checkpoint.pt) greedily for `eval_episodes` games (with the env settings it
    was trained with) and exit, without training"""
    capture_video: bool = False
    """record env 0's greedy evaluation game at each evaluation as an MP4 in runs/{run_name}/videos/ (with
    --eval-checkpoint: in videos/ beside the checkpoint); needs pip install -r requirements/video.txt"""
    checkpoint_frequency: int | None = None
    """write the whole training state to runs/{run_name}/checkpoint.pt every this many env steps (default: every tenth of
    the run), at an interrupt and at the end"""
    resume: str | None = None
    """continue the run in this run directory (runs/{run_name}) from its checkpoint.pt, with its Args; envs start afresh,
    so games in flight are lost"""

    env_id: str = "Breakout-v5"
    """the id of an envpool Atari env (`*-v5`)"""
    repeat_action_probability: float = 0.0
    """sticky actions: the probability that the emulator repeats the previous action"""
    noop_max: int = 30
    """at most this many no-op actions at the start of a game"""
    episodic_life: bool = True
    """end the training episode (terminate, no bootstrap) at every lost life"""
    reward_clip: bool = True
    """train on rewards clipped to their sign"""
    max_episode_steps: int = 27_000
    """truncate a training game after this many agent steps (4 frames each)"""
    total_timesteps: int = 10_000_000
    """total environment steps (agent steps, summed over all envs)"""
    learning_rate: float = 2.5e-4
    """the learning rate of the RAdam optimizer"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over training"""
    num_envs: int = 128
    """the number of parallel environments"""
    num_steps: int = 32
    """the number of steps each env runs per rollout"""
    num_minibatches: int = 32
    """the number of minibatches a rollout is split into"""
    update_epochs: int = 2
    """the number of passes over each rollout"""
    gamma: float = 0.99
    """the discount factor"""
    q_lambda: float = 0.65
    """the lambda of Peng's Q(lambda) targets"""
    start_e: float = 1.0
    """the starting epsilon of the epsilon-greedy behaviour policy"""
    end_e: float = 0.001
    """the final epsilon"""
    exploration_fraction: float = 0.1
    """the fraction of `total_timesteps` over which epsilon decays linearly to `end_e`"""
    max_grad_norm: float = 10.0
    """the maximum global norm of the gradients"""
    eval_frequency: int = 0
    """evaluate the greedy policy every this many env steps (0: only at the end of training)"""
    eval_episodes: int = 8
    """the number of greedy evaluation games, played at once, one per eval env"""
    eval_max_steps: int = 27_000
    """truncate an evaluation game after this many agent steps: this bounds how long an evaluation takes"""
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


# A lower bound on what one envpool Atari env takes (the emulator and its frame buffers take more).
ENV_BYTES = 2 * 2**20


def finalize_args(args: Args) -> Args:
    """Checks the flags and fills in the derived sizes."""
    check_finite(args)  # first: NaN passes every comparison below
    check_not_empty(args)
    positive = [
        "total_timesteps",
        "num_envs",
        "num_steps",
        "num_minibatches",
        "update_epochs",
        "eval_episodes",
        "max_episode_steps",
        "eval_max_steps",
        "learning_rate",
        "max_grad_norm",
    ]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.capture_video:
        check_video_support()
    if args.track and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs wandb: pip install -r requirements/wandb.txt")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32 - 1] (numpy's seed range), got {args.seed}")
    if not args.exp_name or "/" in args.exp_name or "\0" in args.exp_name:
        raise UsageError(f"--exp-name names the run folder and the saved model: it must be a file name, got {args.exp_name!r}")
    if args.checkpoint_frequency is not None and args.checkpoint_frequency <= 0:
        raise UsageError(f"--checkpoint-frequency must be positive, got {args.checkpoint_frequency}")
    if args.eval_frequency < 0:
        raise UsageError(f"--eval-frequency must be 0 (only at the end) or positive, got {args.eval_frequency}")
    if args.noop_max < 1:  # envpool draws from [0, noop_max - 1]: at 0 it crashes
        raise UsageError(f"--noop-max must be at least 1 (1: at most one no-op at a game's start), got {args.noop_max}")
    for name in ["noop_max", "max_episode_steps", "eval_max_steps"]:  # envpool holds them as 32-bit ints
        if getattr(args, name) >= 2**31:
            raise UsageError(f"--{name.replace('_', '-')} must be below 2**31 (envpool's limit), got {getattr(args, name)}")
    for name in ["gamma", "q_lambda", "start_e", "end_e", "exploration_fraction", "repeat_action_probability"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.end_e > args.start_e:
        raise UsageError(f"--end-e {args.end_e} is above --start-e {args.start_e}: epsilon decays from --start-e to --end-e")
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
    # The rollout's uint8 frames and the training and evaluation envs (envpool's own buffers included):
    # a lower bound, so what it refuses could never fit.
    check_memory(
        args.batch_size * 4 * 84 * 84 + (args.num_envs + args.eval_episodes) * ENV_BYTES,
        "the rollout and the envs (--num-envs and --eval-episodes)",
    )
    return args


# --- shared: env_seeds ---
def env_seeds(seed: int, stream: str, num_envs: int, step: int = 0) -> list[int]:
    """One seed per env, each hashed from (run seed, stream, step) by numpy's SeedSequence, so the
    envs of one run share no seed with those of another run (`seed + i` would: seeds 1 and 2
    would share all envs but one) or of another stream ("training", "evaluation"). A resumed run
    passes the step it resumes from, so that its new envs do not replay the run's first episodes."""
    state = np.random.SeedSequence([seed, step, *stream.encode()]).generate_state(num_envs, dtype=np.uint64)
    return [int(s) for s in state % 2**31]  # envpool takes int32 seeds


# --- end shared: env_seeds ---


# --- shared: envpool_atari ---
def make_atari_envs(env_id, seeds, stack_num, args, evaluation=False, render=False):
    """envpool Atari envs, one per seed: 84x84 grayscale, frame skip 4, `stack_num` stacked frames, uint8.

    Evaluation envs follow the training envs' episode rules (`episodic_life` too: after a lost life
    envpool's reset presses FIRE, as in training), with unclipped rewards and games cut at
    `eval_max_steps`. envpool resets an env on the step after its episode ended; `info["reward"]`
    is the unclipped reward and `info["terminated"]` marks game over (`terminated` alone may be a
    lost life). The time limit counts the agent steps of the whole game, over all its lives.
    With `render`, `envs.render()` returns full-colour frames (for --capture-video).
    """
    if env_id not in envpool.list_all_envs():
        raise UsageError(f"unknown envpool env id {env_id!r} (Atari ids look like 'Breakout-v5')")
    if type(envpool.make_spec(env_id)).__name__ != "AtariEnvSpec":
        raise UsageError(f"{env_id} is not an Atari env; this script needs an envpool Atari id such as 'Breakout-v5'")
    return envpool.make(
        env_id,
        env_type="gymnasium",
        num_envs=len(seeds),
        seed=seeds,
        stack_num=stack_num,
        img_height=84,
        img_width=84,
        frame_skip=4,
        repeat_action_probability=args.repeat_action_probability,
        noop_max=args.noop_max,
        max_episode_steps=args.eval_max_steps if evaluation else args.max_episode_steps,
        episodic_life=args.episodic_life,
        reward_clip=args.reward_clip and not evaluation,
        render_mode="rgb_array" if render else None,
    )


class GameStats:
    """Score (sum of unclipped rewards) and length of the game each env plays. The length is envpool's
    `elapsed_step`: the agent steps of the game, without the reset step that follows each lost life.

    With episodic_life a game spans several training episodes; it is over when the last life is
    lost (`info["terminated"]`) or the time limit truncates it.
    """

    def __init__(self, num_envs):
        self.score = np.zeros(num_envs)

    def step(self, info, truncated):
        """Adds one step; returns (score, length) of each game that ended with it."""
        self.score += info["reward"]
        over = (info["terminated"] == 1) | truncated
        ended = list(zip(self.score[over], info["elapsed_step"][over]))
        self.score[over] = 0.0
        return ended


# --- end shared: envpool_atari ---


# --- shared: nature_cnn ---
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def nature_cnn(in_channels: int) -> nn.Sequential:
    """The Nature DQN torso for 84x84 frames, with LayerNorm after every layer: [B, C, 84, 84] -> [B, 512]."""
    return nn.Sequential(
        layer_init(nn.Conv2d(in_channels, 32, 8, stride=4)),
        nn.LayerNorm([32, 20, 20]),
        nn.ReLU(),
        layer_init(nn.Conv2d(32, 64, 4, stride=2)),
        nn.LayerNorm([64, 9, 9]),
        nn.ReLU(),
        layer_init(nn.Conv2d(64, 64, 3, stride=1)),
        nn.LayerNorm([64, 7, 7]),
        nn.ReLU(),
        nn.Flatten(),
        layer_init(nn.Linear(64 * 7 * 7, 512)),
        nn.LayerNorm(512),
        nn.ReLU(),
    )


# --- end shared: nature_cnn ---


# --- shared: pqn_atari_q_network ---
class QNetwork(nn.Module):
    """PQN's Atari Q-network: Nature CNN with LayerNorm and a linear head; takes uint8 frames [B, stack, 84, 84]."""

    def __init__(self, stack_num: int, num_actions: int):
        super().__init__()
        self.torso = nature_cnn(stack_num)
        self.q_head = layer_init(nn.Linear(512, num_actions), std=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_head(self.torso(x / 255.0))


# --- end shared: pqn_atari_q_network ---


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


# --- shared: pqn_act ---
@torch.no_grad()
def act(q_network, obs, epsilon):
    """Epsilon-greedy actions, and max_a Q(obs, a): the value the step that returned obs bootstraps from
    (its next_q in the Q(lambda) targets).
    `epsilon` is a 0-d tensor, so a compiled `act` does not recompile as it decays."""
    q = q_network(obs)
    max_q, greedy = q.max(dim=1)
    explore = torch.rand(obs.shape[0], device=obs.device) < epsilon
    random_actions = torch.randint(q.shape[1], (obs.shape[0],), device=obs.device)
    return torch.where(explore, random_actions, greedy), max_q


# --- end shared: pqn_act ---


def rollout(env_groups, policy, obs, is_reset, epsilon, num_steps, game_stats, staging):
    """Acts epsilon-greedily for `num_steps` steps in every env.

    The envs come in groups, each its own envpool (`env_groups`, columns in order) stepping in the
    background: a group's actions are sent, and while its envs step the device acts for the next
    group, so the env threads and the device work at the same time. `policy(obs, epsilon)`
    returns the actions and max_a Q(obs, a) (`act`). `obs` (uint8 frames) is what the first step
    acts on and `is_reset` (bool array) marks the envs where it is the final observation of an
    ended episode (a lost life, a game over or a truncated game), so that step is a reset step:
    envpool ignores its action and its transition is not real. `game_stats` has one GameStats per
    group; `staging` is a host buffer of one observation, in pinned memory when training on a GPU.
    Returns the rollout as [T, N] tensors, `next_q` for the Q(lambda) targets, the observation and
    reset flags the next rollout starts from, and the games that ended, as (step index, score, length).
    """
    device = obs.device
    num_envs = obs.shape[0]
    b = {
        "obs": torch.zeros((num_steps, *obs.shape), dtype=torch.uint8, device=device),
        "actions": torch.zeros((num_steps, num_envs), dtype=torch.long, device=device),
        "max_q": torch.zeros((num_steps, num_envs), device=device),  # max_a Q(obs[t], a) while acting
    }
    # What the envs return stays on the host until the rollout ends: one transfer, not one per step.
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)
    terminations = np.zeros((num_steps, num_envs), dtype=bool)
    truncations = np.zeros((num_steps, num_envs), dtype=bool)
    resets = np.zeros((num_steps, num_envs), dtype=bool)
    is_reset = is_reset.copy()
    obs = obs.clone()
    starts = np.cumsum([0] + [envs.config["num_envs"] for envs in env_groups])
    groups = [(envs, stats, slice(start, end)) for envs, stats, start, end in zip(env_groups, game_stats, starts, starts[1:])]
    games = []

    def receive(step, envs, stats, cols):
        """The outcome of the group's step `step`: what it returned, and the next observations."""
        next_obs, rewards[step, cols], terminations[step, cols], truncations[step, cols], info = envs.recv()
        staging[cols] = torch.from_numpy(next_obs)
        obs[cols] = staging[cols].to(device, non_blocking=True)
        is_reset[cols] = terminations[step, cols] | truncations[step, cols]
        games.extend((step, score, length) for score, length in stats.step(info, truncations[step, cols]))

    for step in range(num_steps):
        for envs, stats, cols in groups:
            if step > 0:
                receive(step - 1, envs, stats, cols)
            b["obs"][step, cols] = obs[cols]
            resets[step, cols] = is_reset[cols]
            action, max_q = policy(obs[cols], epsilon)
            b["actions"][step, cols], b["max_q"][step, cols] = action, max_q
            # .cpu() waits for the device, so the last copy out of `staging` has finished by now.
            envs.send(action.cpu().numpy())
    for envs, stats, cols in groups:
        receive(num_steps - 1, envs, stats, cols)

    # The value after the last step bootstraps the last targets; the other next_q come from acting.
    _, last_max_q = policy(obs, epsilon)
    b["next_q"] = torch.cat([b["max_q"][1:], last_max_q[None]])
    b["rewards"] = torch.as_tensor(rewards, device=device)
    b["terminations"] = torch.as_tensor(terminations, device=device)
    b["truncations"] = torch.as_tensor(truncations, device=device)
    b["is_reset"] = torch.as_tensor(resets, device=device)
    return b, obs, is_reset, games


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


# --- shared: td_loss ---
def td_loss(q_taken: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real transitions (mask = 1); reset steps (mask = 0) add nothing."""
    return (mask * (q_taken - returns) ** 2).sum() / mask.sum().clamp(min=1.0)


# --- end shared: td_loss ---


# --- shared: pqn_update ---
def grad_step(q_network, optimizer, obs, actions, returns, mask, max_grad_norm):
    """One minibatch of TD regression to the Q(lambda) targets. Returns the loss and the mean Q of
    the actions taken, as tensors (reading them out would wait for the device)."""
    q_taken = q_network(obs).gather(1, actions[:, None]).squeeze(1)
    loss = td_loss(q_taken, returns, mask)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(q_network.parameters(), max_grad_norm, foreach=True)
    optimizer.step()
    return loss.detach(), (q_taken.detach() * mask).sum() / mask.sum().clamp(min=1.0)


def update(train_step, b, returns, update_epochs, minibatch_size):
    """`update_epochs` passes over the rollout in shuffled minibatches, each given to
    `train_step(obs, actions, returns, mask)` (`grad_step`). Returns the mean TD loss and the mean
    Q of the actions taken."""
    mask = (~b["is_reset"]).flatten().float()  # reset steps are not real transitions
    batch = [b["obs"].flatten(0, 1), b["actions"].flatten(), returns.flatten(), mask]
    losses, q_taken_means = [], []
    for _ in range(update_epochs):
        order = torch.randperm(len(mask), device=mask.device)
        # One shuffle of the whole rollout per epoch; the minibatches are consecutive slices of it.
        shuffled = [x[order] for x in batch]
        for minibatch in zip(*[x.split(minibatch_size) for x in shuffled]):
            loss, q_taken_mean = train_step(*minibatch)
            losses.append(loss)
            q_taken_means.append(q_taken_mean)
    return torch.stack(losses).mean().item(), torch.stack(q_taken_means).mean().item()


# --- end shared: pqn_update ---


# --- shared: atari_evaluate ---
def evaluate(q_network, envs, record=None) -> np.ndarray:
    """Scores of one greedy game per eval env: the sum of its unclipped rewards over all its lives.

    A game is over at game over (`info["terminated"]`) or at the time limit. A lost life alone only
    ends an episode: the env resets on the next step (serving the ball, as in training) and the
    game goes on. Envs whose game is over keep stepping until all are over; nothing more is counted.
    `record()`, if given, is called at every frame of env 0's game (after the reset and each step).
    """
    device = next(q_network.parameters()).device
    obs, _ = envs.reset()
    scores = np.zeros(envs.config["num_envs"])
    finished = np.zeros_like(scores, dtype=bool)
    if record:
        record()
    while not finished.all():
        with torch.no_grad():
            actions = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1)
        obs, _, _, truncated, info = envs.step(actions.cpu().numpy())
        if record and not finished[0]:
            record()
        scores += np.where(finished, 0.0, info["reward"])
        finished |= (info["terminated"] == 1) | truncated
    return scores


# --- end shared: atari_evaluate ---


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


MODEL_FORMAT = "pqn_atari_envpool/q_network/v1"
CHECKPOINT_FORMAT = "pqn_atari_envpool/training_state/v2"
VIDEO_FPS = 15  # the agent acts every 4th of the emulator's 60 frames per second


def save_model(path: str, q_network: QNetwork, args: Args, num_actions: int):
    """The file `--save-model` writes, and that qdagger_dqn_atari_impalacnn.py loads as its teacher."""
    save_atomically(
        {
            "format": MODEL_FORMAT,
            "env_id": args.env_id,
            "num_actions": num_actions,
            "observation_shape": [4, 84, 84],
            "q_network": q_network.state_dict(),
            "args": asdict(args),
        },
        path,
    )


# The env settings of a training run that its saved model is evaluated with, unless given again.
ENV_SETTINGS = ["repeat_action_probability", "noop_max", "episodic_life"]


def load_model(path: str, device: torch.device) -> dict:
    """A `--save-model` file, or a run's checkpoint.pt (both hold the Q-network and `args`)."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}; write one with `python pqn_atari_envpool.py --save-model`")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a torch checkpoint ({type(e).__name__})") from None
    try:
        if checkpoint["format"] not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
            raise ValueError
        return {
            "env_id": checkpoint["args"]["env_id"],
            "num_actions": checkpoint["q_network"]["q_head.bias"].numel(),
            "q_network": checkpoint["q_network"],
            "env_settings": {name: checkpoint["args"][name] for name in ENV_SETTINGS},
        }
    except Exception:
        raise UsageError(
            f"{path} is not a pqn_atari_envpool.py model (format {MODEL_FORMAT}) or training checkpoint ({CHECKPOINT_FORMAT})"
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
        for key in "args q_network optimizer iteration global_step recent_scores rng finished".split():
            state[key]
        return state
    except Exception:
        raise UsageError(f"{path} is not a pqn_atari_envpool.py training checkpoint (format {CHECKPOINT_FORMAT})") from None


# --- shared: saved_env_settings ---
def use_saved_env_settings(args, given: set[str], settings: dict, path: str):
    """Evaluation plays as training played: the env settings saved with a model replace those not given
    on the command line, and then pass the checks that flags pass."""
    for name, value in settings.items():
        if name not in given:
            if type(value) is not type(getattr(Args, name)):
                raise UsageError(f"{path} holds {name} = {value!r}, not a {type(getattr(Args, name)).__name__}")
            setattr(args, name, value)
    finalize_args(args)


# --- end shared: saved_env_settings ---


def eval_checkpoint(args: Args, given: set[str], device: torch.device):
    checkpoint = load_model(args.eval_checkpoint, device)
    env_id = checkpoint["env_id"]
    if "env_id" in given and args.env_id != env_id:
        raise UsageError(f"{args.eval_checkpoint} was trained on {env_id}, not {args.env_id}; leave --env-id out")
    use_saved_env_settings(args, given, checkpoint["env_settings"], args.eval_checkpoint)
    envs = make_atari_envs(
        env_id, env_seeds(args.seed, "evaluation", args.eval_episodes), 4, args, evaluation=True, render=args.capture_video
    )
    videos = os.path.join(os.path.dirname(args.eval_checkpoint), "videos")
    if args.capture_video:  # found before the evaluation, not when its video is saved
        check_writable(videos)
    video = VideoRecorder(lambda: envs.render()[0], VIDEO_FPS) if args.capture_video else None
    if envs.action_space.n != checkpoint["num_actions"]:
        raise UsageError(f"{args.eval_checkpoint} has {checkpoint['num_actions']} actions, {env_id} has {envs.action_space.n}")
    q_network = QNetwork(4, checkpoint["num_actions"]).to(device)
    try:
        q_network.load_state_dict(checkpoint["q_network"])
    except (RuntimeError, TypeError) as e:  # weights of another shape, or not a state dict
        raise UsageError(f"{args.eval_checkpoint} does not fit the Q-network: {str(e).splitlines()[0]}") from None
    scores = evaluate(q_network, envs, record=video)
    if video:
        name = os.path.splitext(os.path.basename(args.eval_checkpoint))[0]
        path = os.path.join(videos, f"{name}.mp4")
        video.save(path)
        print(f"video of the first game: {path}")
    print(f"{env_id}: greedy score over {len(scores)} games {scores.mean():.2f} ± {scores.std():.2f}")


def main(args: Args, given: set[str], state: dict | None = None):
    """Trains, or with --eval-checkpoint evaluates; `state` is the checkpoint of the run --resume continues."""
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    # Adam's first moment of a weight that gets no gradient (a dead ReLU unit) decays by 0.9 a step and
    # turns denormal after ~800 steps, and x86 CPUs compute on denormals many times slower. Flushed
    # to zero, nothing of size changes.
    torch.set_flush_denormal(True)
    if args.eval_checkpoint:
        return eval_checkpoint(args, given, device)

    total_steps = args.num_iterations * args.batch_size
    if state and state["finished"]:
        print(f"{args.resume} is finished (step {state['global_step']:,} of {total_steps:,}): nothing to resume")
        return
    checkpoint_frequency = args.checkpoint_frequency or max(args.total_timesteps // 10, 1)
    interrupts = Interrupts()

    # Envs cannot be saved: a resumed run makes them afresh, seeded from the run's seed and the step
    # it resumes from, so that it does not play the run's first games again.
    resume_step = state["global_step"] if state else 0
    # On a GPU the envs run in two groups, each its own envpool, so that one group steps while the
    # GPU acts for the other (see `rollout`). On a CPU the same cores would do both: one group.
    # Env i has the same seed either way.
    seeds = env_seeds(args.seed, "training", args.num_envs, resume_step)
    first = args.num_envs // 2 if device.type == "cuda" else args.num_envs
    env_groups = [make_atari_envs(args.env_id, group, 4, args) for group in (seeds[:first], seeds[first:]) if group]
    eval_envs = make_atari_envs(
        args.env_id,
        env_seeds(args.seed, "evaluation", args.eval_episodes, resume_step),
        4,
        args,
        evaluation=True,
        render=args.capture_video,
    )
    run_dir = args.resume or new_run_dirs([f"{args.env_id}__{args.exp_name}__{args.seed}"])[0]
    check_writable(run_dir)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    num_actions = int(env_groups[0].action_space.n)
    if args.track:
        import wandb

        run_name = os.path.basename(os.path.normpath(run_dir))
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
    writer = SummaryWriter(run_dir, purge_step=state["global_step"] + 1 if state else None)
    if not state:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))

    q_network = QNetwork(4, num_actions).to(device)
    optimizer = RAdam(q_network.parameters(), lr=args.learning_rate, static_state=args.cudagraphs)
    recent_scores = collections.deque(maxlen=20)
    start_iteration, global_step = 0, 0
    if state:
        q_network.load_state_dict(state["q_network"])
        optimizer.load_state_dict(state["optimizer"])
        recent_scores.extend(state["recent_scores"])
        start_iteration, global_step = state["iteration"], state["global_step"]
        set_rng_state(state["rng"])  # last: making the networks drew from torch's generator
    policy = accelerate(lambda obs, epsilon: act(q_network, obs, epsilon), compile=args.compile, cudagraphs=args.cudagraphs)
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

    video = VideoRecorder(lambda: eval_envs.render()[0], VIDEO_FPS) if args.capture_video else None

    def run_evaluation(global_step):
        scores = evaluate(q_network, eval_envs, record=video)
        if video:
            video.save(os.path.join(run_dir, "videos", f"eval_{global_step}.mp4"))
        writer.add_scalar("eval/episodic_return", scores.mean(), global_step)
        print(
            f"eval at step {global_step}: greedy score {scores.mean():.2f} ± {scores.std():.2f} ({len(scores)} games)",
            flush=True,
        )

    def save_checkpoint(iteration, finished=False):
        # What was logged up to the checkpoint reaches the disk first: a run killed after it resumes from it.
        writer.flush()
        save_atomically(
            {
                "format": CHECKPOINT_FORMAT,
                "args": asdict(args),
                "q_network": q_network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "iteration": iteration,
                "global_step": global_step,
                "recent_scores": [float(score) for score in recent_scores],
                "rng": rng_state(),
                # Only after the final evaluation: a run stopped in its last iteration still owes it.
                "finished": finished,
            },
            checkpoint_path,
        )

    def save_trained_model():
        path = os.path.join(run_dir, f"{args.exp_name}.pt")
        save_model(path, q_network, args, num_actions)
        print(f"model saved to {path}")

    obs = np.concatenate([envs.reset()[0] for envs in env_groups])
    # Frames reach the device through one pinned host buffer: a pinned copy is faster and asynchronous.
    staging = torch.empty(obs.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    obs = torch.as_tensor(obs, device=device)
    is_reset = np.zeros(args.num_envs, dtype=bool)
    game_stats = [GameStats(envs.config["num_envs"]) for envs in env_groups]
    progress = Progress(total_steps, start_step=global_step)
    start_step, start_time = global_step, time.time()
    try:
        for iteration in range(start_iteration + 1, args.num_iterations + 1):
            # Rollout: num_steps epsilon-greedy steps in every env.
            lr = args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations) if args.anneal_lr else args.learning_rate
            optimizer.lr.fill_(lr)  # in place: a compiled step reads this very tensor
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps, global_step)
            b, obs, is_reset, games = rollout(
                env_groups, policy, obs, is_reset, torch.tensor(epsilon, device=device), args.num_steps, game_stats, staging
            )
            for step, score, length in games:
                writer.add_scalar("charts/episodic_return", score, global_step + (step + 1) * args.num_envs)
                writer.add_scalar("charts/episodic_length", length, global_step + (step + 1) * args.num_envs)
                recent_scores.append(score)
            global_step += args.batch_size

            # Targets, then update_epochs passes of minibatch TD regression on them.
            returns = targets(b["rewards"], b["terminations"], b["truncations"], b["next_q"])
            td_loss_mean, q_values_mean = update(train_step, b, returns, args.update_epochs, args.minibatch_size)
            if not (math.isfinite(td_loss_mean) and math.isfinite(q_values_mean)):
                last = (
                    f"the last checkpoint is {checkpoint_path}"
                    if os.path.isfile(checkpoint_path)
                    else "no checkpoint was written"
                )
                raise RunFault(
                    f"the TD loss ({td_loss_mean}) or mean Q ({q_values_mean}) is not finite at step {global_step:,}; {last}"
                )

            # Logging.
            sps = (global_step - start_step) / (time.time() - start_time)
            writer.add_scalar("losses/td_loss", td_loss_mean, global_step)
            writer.add_scalar("losses/q_values", q_values_mean, global_step)
            writer.add_scalar("charts/learning_rate", lr, global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            writer.add_scalar("charts/SPS", sps, global_step)
            progress.update(
                global_step, sps, f"return(last 20 ep) {np.mean(recent_scores) if recent_scores else math.nan:8.2f}"
            )
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
                    save_trained_model()
                name = signal.Signals(interrupts.signal).name
                print(
                    f"{name}: stopped at step {global_step:,}; continue with `python pqn_atari_envpool.py --resume {run_dir}`",
                    file=sys.stderr,
                )
                return 128 + interrupts.signal

        # The end: the final evaluation, the saved model and the finished run's checkpoint.
        run_evaluation(global_step)
        if args.save_model:
            save_trained_model()
        save_checkpoint(args.num_iterations, finished=True)
        return interrupts.status_at_the_end(run_dir)
    finally:
        for envs in env_groups:
            envs.close()
        eval_envs.close()
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
                raise UsageError(f"{args.resume}/checkpoint.pt is not a pqn_atari_envpool.py training checkpoint") from None
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
