"""QDagger (Agarwal et al., "Reincarnating Reinforcement Learning", NeurIPS 2022): a DQN student with an
IMPALA CNN, distilled from a PQN teacher, on Atari through envpool.

Reading guide: `main` runs three phases: (1) the teacher plays and fills a replay buffer, (2) the student
learns offline from it (TD loss + `distill_loss`), (3) the student plays and learns online while the
distillation fades (`distill_coefficient`). `FrameReplayBuffer` stores each frame once.
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
from dataclasses import asdict, dataclass, fields

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    """save the student and these Args to runs/{run_name}/{exp_name}.pt at the end (and at an interrupt)"""
    eval_checkpoint: str | None = None
    """evaluate this saved student (or the student of a run's checkpoint.pt) greedily for `eval_episodes` games (with the
    env settings it was trained with) and exit"""
    capture_video: bool = False
    """record env 0's greedy evaluation game at each evaluation as an MP4 in runs/{run_name}/videos/ (with
    --eval-checkpoint: in videos/ beside the checkpoint); needs pip install -r requirements/video.txt"""
    checkpoint_frequency: int | None = None
    """write the training state to runs/{run_name}/checkpoint.pt every this many steps of the current phase (teacher env
    steps, offline gradient steps, student env steps; default: every tenth of each phase), at an interrupt and at the
    end"""
    checkpoint_buffers: bool = False
    """also save the replay buffer of the current phase in each checkpoint (up to 7.5 GB for 1M transitions); without it, a
    resumed run refills the buffer first"""
    resume: str | None = None
    """continue the run in this run directory (runs/{run_name}) from its checkpoint.pt, with its Args; envs start afresh,
    so games in flight are lost"""

    teacher_model_path: str | None = None
    """the teacher: a checkpoint written by `pqn_atari_envpool.py --save-model` for the same env"""
    teacher_eval_episodes: int = 10
    """the number of greedy games that measure the teacher's score"""
    teacher_steps: int = 500_000
    """phase 1: env steps the teacher plays to fill the teacher replay buffer, epsilon-greedily with epsilon decaying from
    `start_e` to `end_e` over all of them"""
    offline_steps: int = 500_000
    """phase 2: gradient steps of the student on the teacher buffer"""
    offline_eval_frequency: int = 100_000
    """evaluate the student every this many offline gradient steps"""
    temperature: float = 0.1
    """the softmax temperature of the distillation loss (the QDagger authors' 0.1: a PQN teacher's Q-values differ little
    between actions, and at 1 the teacher's softmax is close to uniform)"""
    distillation: bool = True
    """add the distillation loss to the TD loss (off: the student learns from the teacher's data by TD alone)"""

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
    """phase 3: env steps of the student (summed over all envs); 0 ends the run after phase 2"""
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimizer"""
    num_envs: int = 1
    """the number of parallel environments"""
    buffer_size: int = 1_000_000
    """the capacity of the student's replay buffer, in transitions"""
    gamma: float = 0.99
    """the discount factor"""
    target_network_frequency: int = 1000
    """copy the student into the target network every this many env steps (in the offline phase: gradient steps)"""
    batch_size: int = 32
    """the number of transitions per gradient step"""
    start_e: float = 1.0
    """the starting epsilon of the epsilon-greedy behaviour policy (teacher and student)"""
    end_e: float = 0.01
    """the final epsilon"""
    exploration_fraction: float = 0.10
    """phase 3: the fraction of `total_timesteps` over which the student's epsilon decays linearly to `end_e`, on a clock
    that starts at `offline_steps`"""
    learning_starts: int = 80_000
    """phase 3: the student learns from its own buffer once its clock (`offline_steps` + its env steps) passes this"""
    train_frequency: int = 4
    """one gradient step every this many env steps"""
    eval_frequency: int = 0
    """evaluate the greedy student every this many env steps of phase 3 (0: only at the end)"""
    eval_episodes: int = 8
    """the number of greedy evaluation games, played at once, one per eval env"""
    eval_max_steps: int = 27_000
    """truncate an evaluation game after this many agent steps: this bounds how long an evaluation takes"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# A lower bound on what one envpool Atari env takes (the emulator and its frame buffers take more).
ENV_BYTES = 2 * 2**20


def finalize_args(args: Args) -> Args:
    """Checks the flags."""
    check_finite(args)  # first: NaN passes every comparison below
    check_not_empty(args)
    positive = [
        "teacher_eval_episodes",
        "teacher_steps",
        "num_envs",
        "buffer_size",
        "batch_size",
        "target_network_frequency",
        "train_frequency",
        "eval_episodes",
        "eval_max_steps",
        "max_episode_steps",
        "offline_eval_frequency",
        "learning_rate",
        "temperature",
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
    for name in ["offline_steps", "total_timesteps", "learning_starts", "eval_frequency"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.noop_max < 1:  # envpool draws from [0, noop_max - 1]: at 0 it crashes
        raise UsageError(f"--noop-max must be at least 1 (1: at most one no-op at a game's start), got {args.noop_max}")
    for name in ["noop_max", "max_episode_steps", "eval_max_steps"]:  # envpool holds them as 32-bit ints
        if getattr(args, name) >= 2**31:
            raise UsageError(f"--{name.replace('_', '-')} must be below 2**31 (envpool's limit), got {getattr(args, name)}")
    for name in ["gamma", "start_e", "end_e", "exploration_fraction", "repeat_action_probability"]:
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.end_e > args.start_e:
        raise UsageError(f"--end-e {args.end_e} is above --start-e {args.start_e}: epsilon decays from --start-e to --end-e")
    if args.buffer_size < args.num_envs or args.teacher_steps < args.num_envs:
        raise UsageError("--buffer-size and --teacher-steps must hold at least one step of every env")
    if args.batch_size > min(args.buffer_size, args.teacher_steps):
        raise UsageError(f"--batch-size {args.batch_size} is larger than the replay buffers (--buffer-size, --teacher-steps)")
    if 0 < args.total_timesteps < args.num_envs:
        raise UsageError(f"--total-timesteps {args.total_timesteps} is not one step of every env (--num-envs {args.num_envs})")
    if args.eval_checkpoint is None:  # evaluating a saved student makes no replay buffer
        # The training and evaluation envs are open throughout; with them, in turn, the teacher's evaluation
        # envs, the teacher buffer, and the student's buffer (made once the teacher's is freed).
        student_buffer = (
            FrameReplayBuffer.nbytes(args.buffer_size, args.num_envs) if args.total_timesteps > 0 else 0
        )  # none without phase 3
        in_turn = max(
            args.teacher_eval_episodes * ENV_BYTES, FrameReplayBuffer.nbytes(args.teacher_steps, args.num_envs), student_buffer
        )
        check_memory(
            (args.num_envs + args.eval_episodes) * ENV_BYTES + in_turn,
            "the larger replay buffer (--buffer-size, --teacher-steps) and the envs (--num-envs, --eval-episodes, "
            "--teacher-eval-episodes)",
        )
    if args.checkpoint_frequency is not None and args.checkpoint_frequency <= 0:
        raise UsageError(f"--checkpoint-frequency must be positive, got {args.checkpoint_frequency}")
    if args.teacher_model_path is None and args.eval_checkpoint is None:
        raise UsageError(f"--teacher-model-path is required; {TEACHER_HINT.format(env_id=args.env_id)}")
    return args


TEACHER_HINT = (
    "produce a teacher with `python pqn_atari_envpool.py --env-id {env_id} --save-model` "
    "(it writes runs/<run_name>/pqn_atari_envpool.pt)"
)


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


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class ConvSequence(nn.Module):
    """IMPALA stage: conv 3x3, max-pool 3x3 stride 2 (halves the size), two residual blocks."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.res0 = ResidualBlock(out_channels)
        self.res1 = ResidualBlock(out_channels)

    def forward(self, x):
        return self.res1(self.res0(self.pool(self.conv(x))))


class ImpalaQNetwork(nn.Module):
    """The student: IMPALA CNN (stages of 16, 32, 32 channels) -> 256 -> Q; takes uint8 frames [B, 4, 84, 84]."""

    def __init__(self, num_actions: int, stack_num: int = 4):
        super().__init__()
        self.network = nn.Sequential(
            ConvSequence(stack_num, 16),
            ConvSequence(16, 32),
            ConvSequence(32, 32),
            nn.Flatten(),
            nn.ReLU(),
            nn.Linear(32 * 11 * 11, 256),
            nn.ReLU(),
            nn.Linear(256, num_actions),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x / 255.0)


class FrameReplayBuffer:
    """Replay memory that stores each 84x84 frame once and rebuilds the 4-frame stacks.

    Each env has a ring of frames in the order it observed them: one new frame per step while the
    stack shifts, and a whole new stack when envpool starts a new episode (the stack no longer
    continues the previous one). A transition keeps the positions of the newest frames of its
    observation and next observation, so the stacks it gives back are exactly the ones the agent
    saw, and never reach across a new episode. Reset steps are not stored; a transition whose frames
    were overwritten is dropped (oldest first).
    """

    def __init__(self, capacity: int, num_envs: int, stack_num: int = 4, frame_shape=(84, 84)):
        self.num_envs, self.stack_num = num_envs, stack_num
        self.capacity = capacity // num_envs  # transitions per env
        self.num_frames = self.frame_capacity(self.capacity)  # frames per env
        self.frames = np.zeros((num_envs, self.num_frames, *frame_shape), dtype=np.uint8)
        self.obs_pos = np.zeros((num_envs, self.capacity), dtype=np.int64)
        self.next_pos = np.zeros((num_envs, self.capacity), dtype=np.int64)
        self.actions = np.zeros((num_envs, self.capacity), dtype=np.int64)
        self.rewards = np.zeros((num_envs, self.capacity), dtype=np.float32)
        self.terminations = np.zeros((num_envs, self.capacity), dtype=np.float32)
        self.head = np.zeros(num_envs, dtype=np.int64)  # transitions ever stored, per env
        self.tail = np.zeros(num_envs, dtype=np.int64)  # the oldest transition still valid
        self.frame_head = np.full(num_envs, -1, dtype=np.int64)  # position of the newest frame
        self.last_obs = None

    @staticmethod
    def frame_capacity(capacity_per_env: int) -> int:
        # Reset steps add frames without adding transitions (and a new game adds a whole stack):
        # a 1/16 margin keeps nearly `capacity` transitions while staying within memory.
        return capacity_per_env + capacity_per_env // 16 + 8

    @classmethod
    def nbytes(cls, capacity: int, num_envs: int, frame_shape=(84, 84)) -> int:
        """Bytes the buffer takes, computed without allocating it."""
        per_env = capacity // num_envs
        frame_bytes = cls.frame_capacity(per_env) * int(np.prod(frame_shape))
        transition_bytes = per_env * (8 + 8 + 8 + 4 + 4)
        return num_envs * (frame_bytes + transition_bytes)

    def __len__(self):
        return int((self.head - self.tail).sum())

    STATE = ["frames", "obs_pos", "next_pos", "actions", "rewards", "terminations", "head", "tail", "frame_head"]

    def state_dict(self) -> dict:
        """The stored transitions, as tensors (they load with weights_only=True)."""
        state = {name: torch.from_numpy(getattr(self, name)) for name in self.STATE}
        state["last_obs"] = None if self.last_obs is None else torch.from_numpy(self.last_obs)
        return state

    def load_state_dict(self, state: dict):
        for name in self.STATE:
            getattr(self, name)[...] = state[name].numpy()
        self.last_obs = None if state["last_obs"] is None else state["last_obs"].numpy().copy()

    def _append_frames(self, envs, frames):
        for k in range(frames.shape[1]):
            self.frame_head[envs] += 1
            self.frames[envs, self.frame_head[envs] % self.num_frames] = frames[:, k]

    def observe(self, obs):
        """Takes the observation every env now acts on (call once after reset, then after every step)."""
        if self.last_obs is None:
            new_stack = np.ones(self.num_envs, dtype=bool)
        else:
            new_stack = ~(obs[:, :-1] == self.last_obs[:, 1:]).all(axis=(1, 2, 3))
        shifted = np.flatnonzero(~new_stack)
        self._append_frames(shifted, obs[shifted, -1:])
        fresh = np.flatnonzero(new_stack)
        self._append_frames(fresh, obs[fresh])
        self.last_obs = obs
        # Drop transitions whose oldest frame has just been overwritten.
        oldest_kept = self.frame_head - self.num_frames + 1
        while True:
            stale = (self.tail < self.head) & (
                self.obs_pos[np.arange(self.num_envs), self.tail % self.capacity] - (self.stack_num - 1) < oldest_kept
            )
            if not stale.any():
                break
            self.tail[stale] += 1

    def add(self, actions, rewards, terminations, next_obs, real):
        """Stores the transitions of one vector step: from the observation last observed, taking
        `actions`, to `next_obs`; only for envs where the step is `real` (not a reset step)."""
        obs_pos = self.frame_head.copy()
        self.observe(next_obs)
        envs = np.flatnonzero(real)
        slot = self.head[envs] % self.capacity
        self.obs_pos[envs, slot] = obs_pos[envs]
        self.next_pos[envs, slot] = self.frame_head[envs]
        self.actions[envs, slot] = actions[envs]
        self.rewards[envs, slot] = rewards[envs]
        self.terminations[envs, slot] = terminations[envs]
        self.head[envs] += 1
        full = self.head - self.tail > self.capacity
        self.tail[full] = self.head[full] - self.capacity

    def stacks(self, envs, positions):
        """The frame stacks [B, stack, 84, 84] whose newest frames are at `positions` of `envs`."""
        offsets = np.arange(-self.stack_num + 1, 1)
        return self.frames[envs[:, None], (positions[:, None] + offsets) % self.num_frames]

    def transitions(self, envs, indices):
        """Transitions by env and absolute index: obs, actions, rewards, next_obs, terminations."""
        slot = indices % self.capacity
        return (
            self.stacks(envs, self.obs_pos[envs, slot]),
            self.actions[envs, slot],
            self.rewards[envs, slot],
            self.stacks(envs, self.next_pos[envs, slot]),
            self.terminations[envs, slot],
        )

    def sample(self, batch_size, rng, device):
        sizes = self.head - self.tail
        flat = rng.integers(0, sizes.sum(), size=batch_size)  # uniform over all stored transitions
        envs = np.searchsorted(np.cumsum(sizes), flat, side="right")
        indices = self.tail[envs] + flat - (np.cumsum(sizes) - sizes)[envs]
        return [torch.as_tensor(x, device=device) for x in self.transitions(envs, indices)]


def distill_loss(teacher_q, student_q, temperature):
    """KL(softmax(teacher_q / T) || softmax(student_q / T)), summed over actions, averaged over the batch."""
    teacher_log_p = F.log_softmax(teacher_q / temperature, dim=1)
    student_log_p = F.log_softmax(student_q / temperature, dim=1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(dim=1).mean()


def distill_coefficient(student_returns, teacher_return, min_episodes=10):
    """QDagger's weight on distillation: 1 - student / teacher score, floored at 0; 1 until the
    student has finished `min_episodes` games. Distillation fades as the student catches up.
    The student's scores are those of its epsilon-greedy training games, the teacher's of its greedy
    evaluation, so the weight reaches 0 only once the exploring student matches the greedy teacher."""
    if len(student_returns) < min_episodes:
        return 1.0
    if teacher_return <= 0:  # the ratio means nothing: distill only while the student scores less
        return float(np.mean(student_returns) < teacher_return)
    return max(1.0 - float(np.mean(student_returns)) / teacher_return, 0.0)


def td_target(target_network, rewards, next_obs, terminations, gamma):
    """One-step DQN target from the target network; truncation is not termination, so it bootstraps."""
    with torch.no_grad():
        return rewards + gamma * (1.0 - terminations) * target_network(next_obs).max(dim=1).values


# --- shared: linear_schedule ---
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    if duration <= 0:
        return end_e
    return max(end_e, start_e + (end_e - start_e) * t / duration)


# --- end shared: linear_schedule ---


def teacher_epsilon(args: Args, teacher_step: int) -> float:
    """Phase 1: epsilon decays over all teacher steps, so the teacher's buffer holds exploratory
    and expert play alike (mean epsilon about (start_e + end_e) / 2)."""
    return linear_schedule(args.start_e, args.end_e, args.teacher_steps, teacher_step)


def student_clock(args: Args, global_step: int) -> int:
    """Phase 3's schedules continue from the offline phase: its gradient steps count as steps of the
    student's clock, so a reincarnated student does not start over at epsilon 1 with no learning."""
    return args.offline_steps + global_step


def student_epsilon(args: Args, global_step: int) -> float:
    return linear_schedule(
        args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps, student_clock(args, global_step)
    )


def student_learns(args: Args, global_step: int) -> bool:
    return student_clock(args, global_step) > args.learning_starts


def play_step(envs, q_network, rb, obs, is_reset, epsilon, game_stats, device):
    """One epsilon-greedy vector step whose real transitions (not reset steps) go into `rb`.
    Returns the next observation, which envs' next step is a reset step, and the games that ended."""
    with torch.no_grad():
        greedy = q_network(torch.as_tensor(obs, device=device)).argmax(dim=1).cpu().numpy()
    explore = np.random.random(len(obs)) < epsilon
    actions = np.where(explore, np.random.randint(int(envs.action_space.n), size=len(obs)), greedy)
    next_obs, rewards, terminations, truncations, info = envs.step(actions)
    rb.add(actions, rewards, terminations, next_obs, real=~is_reset)
    return next_obs, terminations | truncations, game_stats.step(info, truncations)


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

# The same teacher, moved: checked against the fingerprint of its weights that the run saved.
RESUME_MAY_CHANGE.add("teacher_model_path")


TEACHER_FORMAT = "pqn_atari_envpool/q_network/v1"


def load_teacher(path: str, env_id: str, num_actions: int, device: torch.device) -> QNetwork:
    """The teacher Q-network from a `pqn_atari_envpool.py --save-model` file, checked against this run."""
    hint = TEACHER_HINT.format(env_id=env_id)
    if not os.path.isfile(path):
        raise UsageError(f"no teacher at {path}; {hint}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a torch checkpoint ({type(e).__name__}); {hint}") from None
    keys = ["env_id", "num_actions", "observation_shape", "q_network"]
    if (
        not isinstance(checkpoint, dict)
        or checkpoint.get("format") != TEACHER_FORMAT
        or any(key not in checkpoint for key in keys)
    ):
        raise UsageError(f"{path} is not a pqn_atari_envpool.py checkpoint; {hint}")
    if checkpoint["env_id"] != env_id:
        raise UsageError(f"the teacher at {path} was trained on {checkpoint['env_id']}, this run is {env_id}; {hint}")
    if checkpoint["num_actions"] != num_actions or checkpoint["observation_shape"] != [4, 84, 84]:
        raise UsageError(
            f"the teacher at {path} has {checkpoint['num_actions']} actions and observations "
            f"{checkpoint['observation_shape']}, {env_id} has {num_actions} and [4, 84, 84]; {hint}"
        )
    teacher = QNetwork(4, num_actions).to(device)
    try:
        teacher.load_state_dict(checkpoint["q_network"])
    except (RuntimeError, TypeError) as e:  # weights of another shape, or not a state dict
        raise UsageError(f"the teacher at {path} does not fit the Q-network ({str(e).splitlines()[0]}); {hint}") from None
    return teacher.eval()


def weights_fingerprint(network: nn.Module) -> str:
    """A digest of a network's weights: a resumed run checks that its teacher is the one it began with."""
    digest = hashlib.sha256()
    for name, tensor in network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


STUDENT_FORMAT = "qdagger_dqn_atari_impalacnn/student/v1"
CHECKPOINT_FORMAT = "qdagger_dqn_atari_impalacnn/training_state/v2"
VIDEO_FPS = 15  # the agent acts every 4th of the emulator's 60 frames per second


# The env settings of a training run that its saved student is evaluated with, unless given again.
ENV_SETTINGS = ["repeat_action_probability", "noop_max", "episodic_life"]


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
    """Evaluates a student saved with --save-model, or the student of a run's checkpoint.pt."""
    path = args.eval_checkpoint
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}; write one with `python qdagger_dqn_atari_impalacnn.py --save-model`")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        if checkpoint["format"] not in (STUDENT_FORMAT, CHECKPOINT_FORMAT):
            raise ValueError
        env_id = checkpoint["args"]["env_id"]
        env_settings = {name: checkpoint["args"][name] for name in ENV_SETTINGS}
        head_bias = list(checkpoint["student"].values())[-1]  # of the last layer, one per action
        student = ImpalaQNetwork(head_bias.numel()).to(device)
        student.load_state_dict(checkpoint["student"])
    except Exception:
        raise UsageError(
            f"{path} is not a qdagger_dqn_atari_impalacnn.py student (format {STUDENT_FORMAT}) or training checkpoint "
            f"({CHECKPOINT_FORMAT})"
        ) from None
    if "env_id" in given and args.env_id != env_id:
        raise UsageError(f"{path} was trained on {env_id}, not {args.env_id}; leave --env-id out")
    use_saved_env_settings(args, given, env_settings, path)
    envs = make_atari_envs(
        env_id, env_seeds(args.seed, "evaluation", args.eval_episodes), 4, args, evaluation=True, render=args.capture_video
    )
    videos = os.path.join(os.path.dirname(args.eval_checkpoint), "videos")
    if args.capture_video:  # found before the evaluation, not when its video is saved
        check_writable(videos)
    video = VideoRecorder(lambda: envs.render()[0], VIDEO_FPS) if args.capture_video else None
    scores = evaluate(student, envs, record=video)
    if video:
        name = os.path.splitext(os.path.basename(args.eval_checkpoint))[0]
        path = os.path.join(videos, f"{name}.mp4")
        video.save(path)
        print(f"video of the first game: {path}")
    envs.close()
    print(f"{env_id}: greedy score over {len(scores)} games {scores.mean():.2f} ± {scores.std():.2f}")


PHASE_LOGS = {1: "teacher", 2: "offline"}  # the subdirectories phases 1 and 2 log to
FINISHED = 4  # the phase of the checkpoint written at the end of a run


def load_training_state(run_dir: str) -> dict:
    """A run's checkpoint.pt, checked for every key that resuming reads. Loaded on the CPU whatever the
    device: resuming copies it into the run's own tensors, and random states must be CPU tensors.
    Memory-mapped: a saved replay buffer (7.5 GB for 1M transitions) is read from the file as it is
    copied into the run's buffer, not held in memory twice."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(
            f"no checkpoint at {path}: --resume takes the run directory (runs/<run_name>) of a run that wrote one"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if state["format"] != CHECKPOINT_FORMAT:
            raise ValueError
        for key in [
            "args",
            "phase",
            "phase_step",
            "teacher_return",
            "teacher_fingerprint",
            "student",
            "target_network",
            "optimizer",
            "rng",
            "sample_rng",
            "online",
            "buffer",
            "buffer_len",
        ]:
            state[key]
        return state
    except Exception:
        raise UsageError(
            f"{path} is not a qdagger_dqn_atari_impalacnn.py training checkpoint (format {CHECKPOINT_FORMAT})"
        ) from None


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

    if state and state["phase"] == FINISHED:
        print(f"{args.resume} is finished: nothing to resume")
        return
    # Where the run starts: (phase, steps of that phase already done). Phases 1 and 3 count env
    # steps, phase 2 gradient steps. Without its saved buffer, phase 1 starts over: its work is the buffer.
    start_phase, start_step = (state["phase"], state["phase_step"]) if state else (1, 0)
    if state and start_phase == 1 and state["buffer"] is None:
        start_step = 0
    saved_buffer = state.pop("buffer") if state else None
    rng = np.random.default_rng(args.seed)  # replay sampling
    # Envs cannot be saved: a resumed run makes them afresh, seeded from the run's seed and where it resumes.
    resumed_in = f" (resumed in phase {start_phase})" if state else ""
    envs = make_atari_envs(args.env_id, env_seeds(args.seed, "training" + resumed_in, args.num_envs, start_step), 4, args)
    eval_envs = make_atari_envs(
        args.env_id,
        env_seeds(args.seed, "evaluation" + resumed_in, args.eval_episodes, start_step),
        4,
        args,
        evaluation=True,
        render=args.capture_video,
    )
    video = VideoRecorder(lambda: eval_envs.render()[0], VIDEO_FPS) if args.capture_video else None
    num_actions = int(envs.action_space.n)
    teacher = load_teacher(args.teacher_model_path, args.env_id, num_actions, device)
    if state and weights_fingerprint(teacher) != state["teacher_fingerprint"]:
        raise UsageError(f"the teacher at {args.teacher_model_path} is not the one the resumed run was trained with")
    run_dir = args.resume or new_run_dirs([f"{args.env_id}__{args.exp_name}__{args.seed}"])[0]
    check_writable(run_dir)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    interrupts = Interrupts()
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

    writers = []  # all closed however the run ends: a writer not closed loses the events it has not yet written

    def phase_writer(phase):
        """Each phase logs on its own step axis, so each has its own event file: phases 1 and 2 in
        runs/{run_name}/teacher and /offline, phase 3 in runs/{run_name} as every script logs. The
        phase a run resumes in purges what it logged after its checkpoint; a later phase, all but step 0."""
        purge_step = None if not state else start_step + 1 if phase == start_phase else 1
        writers.append(
            SummaryWriter(run_dir if phase == 3 else os.path.join(run_dir, PHASE_LOGS[phase]), purge_step=purge_step)
        )
        return writers[-1]

    student = ImpalaQNetwork(num_actions).to(device)
    target_network = ImpalaQNetwork(num_actions).to(device)
    target_network.load_state_dict(student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=args.learning_rate)
    # Phase 3's state beyond the networks: the distillation coefficient, the env steps owed a
    # gradient step, the last 10 student scores (for the coefficient) and the last 20 (for the progress line).
    online = {"distill_coeff": float(args.distillation), "pending_train_steps": 0, "student_scores": [], "recent_scores": []}
    if state:
        student.load_state_dict(state["student"])
        target_network.load_state_dict(state["target_network"])
        optimizer.load_state_dict(state["optimizer"])
        teacher_return = state["teacher_return"]
        online.update(state["online"])
        rng.bit_generator.state = state["sample_rng"]
        set_rng_state(state["rng"])  # last: making the networks drew from torch's generator
    student_scores = collections.deque(online.pop("student_scores"), maxlen=10)
    recent_scores = collections.deque(online.pop("recent_scores"), maxlen=20)

    def evaluate_student(writer, tag, step, video_name, label):
        """Greedy games of the student: their mean score logged as `tag` at `step` and printed after `label`."""
        scores = evaluate(student, eval_envs, record=video)
        if video:
            video.save(os.path.join(run_dir, "videos", f"{video_name}.mp4"))
        writer.add_scalar(tag, scores.mean(), step)
        print(f"{label}: greedy score {scores.mean():.2f} ± {scores.std():.2f} ({len(scores)} games)", flush=True)

    def save_checkpoint(phase, phase_step, rb=None):
        # What was logged up to the checkpoint reaches the disk first: a run killed after it resumes from it.
        for writer in writers:
            writer.flush()
        save_atomically(
            {
                "format": CHECKPOINT_FORMAT,
                "args": asdict(args),
                "phase": phase,
                "phase_step": phase_step,
                "teacher_return": teacher_return,
                "teacher_fingerprint": weights_fingerprint(teacher),
                "student": student.state_dict(),
                "target_network": target_network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "online": {**online, "student_scores": list(student_scores), "recent_scores": list(recent_scores)},
                "rng": rng_state(),
                "sample_rng": rng.bit_generator.state,
                "buffer": rb.state_dict() if rb is not None and args.checkpoint_buffers else None,
                "buffer_len": len(rb) if rb is not None else 0,
            },
            checkpoint_path,
        )

    def checkpoint_due(phase_step, length, step_size=1):
        every = args.checkpoint_frequency or max(length // 10, 1)
        return crossed(phase_step, step_size, every) and phase_step < length

    def save_student():
        path = os.path.join(run_dir, f"{args.exp_name}.pt")
        model = {
            "format": STUDENT_FORMAT,
            "env_id": args.env_id,
            "num_actions": num_actions,
            "student": student.state_dict(),
            "args": asdict(args),
        }
        save_atomically(model, path)
        print(f"model saved to {path}")

    def stop(phase, phase_step, rb):
        """An interrupt: a checkpoint (and the student with --save-model), one line, exit 128 + signal."""
        save_checkpoint(phase, phase_step, rb)
        if args.save_model:
            save_student()
        name = signal.Signals(interrupts.signal).name
        print(
            f"{name}: stopped in phase {phase} at step {phase_step:,}; continue with `python "
            f"qdagger_dqn_atari_impalacnn.py --resume {run_dir}`",
            file=sys.stderr,
        )
        return 128 + interrupts.signal

    def gradient_step(rb, distill_coeff):
        obs_b, actions_b, rewards_b, next_obs_b, terminations_b = rb.sample(args.batch_size, rng, device)
        target = td_target(target_network, rewards_b, next_obs_b, terminations_b, args.gamma)
        student_q = student(obs_b)
        q_taken = student_q.gather(1, actions_b[:, None]).squeeze(1)
        td_loss = F.mse_loss(q_taken, target)
        with torch.no_grad():
            teacher_q = teacher(obs_b)
        d_loss = distill_loss(teacher_q, student_q, args.temperature)
        loss = td_loss + distill_coeff * d_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return td_loss.detach(), d_loss.detach(), q_taken.detach().mean()

    def log_losses(writer, prefix, losses, step):
        td, distill, q = (torch.stack(x).mean().item() for x in zip(*losses))
        if not all(math.isfinite(value) for value in (td, distill, q)):
            phase = "offline gradient step" if prefix else "online env step"
            last = (
                f"the last checkpoint is {checkpoint_path}" if os.path.isfile(checkpoint_path) else "no checkpoint was written"
            )
            raise RunFault(
                f"a loss or mean Q is not finite at {phase} {step:,} (TD {td}, distillation {distill}, Q {q}); {last}"
            )
        writer.add_scalar(f"losses/{prefix}td_loss", td, step)
        writer.add_scalar(f"losses/{prefix}distill_loss", distill, step)
        writer.add_scalar(f"losses/{prefix}q_values", q, step)

    def load_saved_buffer(rb):
        """Copies the checkpoint's replay buffer into `rb`, and lets go of the checkpoint's."""
        nonlocal saved_buffer
        rb.load_state_dict(saved_buffer)
        saved_buffer = None

    def fill_teacher_buffer(writer, first_step):
        """Phase 1: the teacher plays epsilon-greedily into the teacher buffer, from `first_step` on.
        Returns the buffer, or the exit status of an interrupt. Without a writer (a resumed phase 2
        refilling its buffer), nothing is logged or checkpointed."""
        rb = FrameReplayBuffer(args.teacher_steps, args.num_envs)
        if first_step:
            load_saved_buffer(rb)
        obs, _ = envs.reset()
        rb.observe(obs)
        is_reset = np.zeros(args.num_envs, dtype=bool)
        game_stats = GameStats(args.num_envs)
        start_time = time.time()
        for step in range(first_step // args.num_envs, args.teacher_steps // args.num_envs):
            teacher_step = (step + 1) * args.num_envs
            obs, is_reset, games = play_step(
                envs, teacher, rb, obs, is_reset, teacher_epsilon(args, step * args.num_envs), game_stats, device
            )
            if writer is None:
                if interrupts.signal:  # the run stays where it resumed: phase 2, its buffer not yet refilled
                    return stop(2, start_step, None)
                continue
            for score, _ in games:
                writer.add_scalar("charts/teacher/episodic_return", score, teacher_step)
            if interrupts.signal:
                return stop(1, teacher_step, rb)
            if checkpoint_due(teacher_step, args.teacher_steps, args.num_envs):
                save_checkpoint(1, teacher_step, rb)
        if writer is not None:
            writer.add_scalar(
                "charts/teacher/SPS", (args.teacher_steps - first_step) / (time.time() - start_time), args.teacher_steps
            )
        print(f"phase 1: {len(rb):,} teacher transitions in {time.time() - start_time:.0f} s", flush=True)
        return rb

    online_writer = phase_writer(3)
    try:
        if not state:
            online_writer.add_text(
                "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items())
            )
            # The teacher's score sets the scale of the distillation coefficient.
            teacher_eval_envs = make_atari_envs(
                args.env_id, env_seeds(args.seed, "teacher evaluation", args.teacher_eval_episodes), 4, args, evaluation=True
            )
            teacher_scores = evaluate(teacher, teacher_eval_envs)
            teacher_eval_envs.close()
            teacher_return = float(teacher_scores.mean())
            print(
                f"teacher: greedy score {teacher_return:.2f} ± {teacher_scores.std():.2f} ({len(teacher_scores)} games)",
                flush=True,
            )
            if teacher_return <= 0:
                print("warning: the teacher scores <= 0; distillation stops once the student scores as much", flush=True)
        student_buffer = (
            f"student {FrameReplayBuffer.nbytes(args.buffer_size, args.num_envs) / 2**30:.2f} GiB ({args.buffer_size:,})"
            if args.total_timesteps
            else "no student buffer (no phase 3)"
        )
        print(
            f"replay buffers: teacher {FrameReplayBuffer.nbytes(args.teacher_steps, args.num_envs) / 2**30:.2f} GiB "
            f"({args.teacher_steps:,} transitions), {student_buffer}",
            flush=True,
        )

        if start_phase == 1:
            # Phase 1: the teacher fills the teacher buffer.
            writer = phase_writer(1)
            if not state:
                writer.add_scalar("charts/teacher/avg_episodic_return", teacher_return, 0)
            teacher_rb = fill_teacher_buffer(writer, start_step)
            writer.close()
            if isinstance(teacher_rb, int):
                return teacher_rb  # interrupted
        elif start_phase == 2 and saved_buffer is not None:
            teacher_rb = FrameReplayBuffer(args.teacher_steps, args.num_envs)
            load_saved_buffer(teacher_rb)
        elif start_phase == 2:
            # Resumed in phase 2 without the saved buffer: the teacher plays phase 1 again, unlogged.
            teacher_rb = fill_teacher_buffer(None, 0)
            if isinstance(teacher_rb, int):
                return teacher_rb  # interrupted

        if start_phase <= 2:
            # Phase 2: offline, the student learns from the teacher's buffer (TD + distillation).
            writer = phase_writer(2)
            first = start_step if start_phase == 2 else 0
            start_time, losses = time.time(), []
            for offline_step in range(first + 1, args.offline_steps + 1):
                losses.append(gradient_step(teacher_rb, 1.0 if args.distillation else 0.0))
                if offline_step % args.target_network_frequency == 0:
                    target_network.load_state_dict(student.state_dict())
                if offline_step % 100 == 0 or offline_step == args.offline_steps:
                    log_losses(writer, "offline/", losses, offline_step)
                    writer.add_scalar("charts/offline/SPS", (offline_step - first) / (time.time() - start_time), offline_step)
                    losses = []
                if offline_step % args.offline_eval_frequency == 0 or offline_step == args.offline_steps:
                    tag, label = "charts/offline/avg_episodic_return", f"phase 2: step {offline_step:,}: student"
                    evaluate_student(writer, tag, offline_step, f"offline_{offline_step}", label)
                if interrupts.signal:
                    # After the last offline step the run resumes in phase 3, with no teacher buffer to refill.
                    return stop(2, offline_step, teacher_rb) if offline_step < args.offline_steps else stop(3, 0, None)
                if checkpoint_due(offline_step, args.offline_steps):
                    save_checkpoint(2, offline_step, teacher_rb)
            writer.close()
            del teacher_rb
        if args.total_timesteps == 0:
            # The student before the checkpoint that marks the run finished: a run killed between the
            # two is resumed, not left finished without its student.
            if args.save_model:
                save_student()
            save_checkpoint(FINISHED, 0)
            return interrupts.status_at_the_end(run_dir)

        # Phase 3: online, the student acts and learns from its own buffer; distillation fades as
        # the student's score approaches the teacher's.
        writer = online_writer
        rb = FrameReplayBuffer(args.buffer_size, args.num_envs)
        first = start_step if start_phase == 3 else 0
        refill = 0
        if start_phase == 3 and saved_buffer is not None:
            load_saved_buffer(rb)
        elif start_phase == 3:
            # Without its saved buffer, the student plays on (and its clock runs) but learns again
            # only once the new buffer holds as many transitions as the old one did, up to learning_starts.
            refill = min(state["buffer_len"], args.learning_starts)
        obs, _ = envs.reset()
        rb.observe(obs)
        is_reset = np.zeros(args.num_envs, dtype=bool)
        game_stats = GameStats(args.num_envs)
        num_vector_steps = args.total_timesteps // args.num_envs
        progress = Progress(num_vector_steps * args.num_envs, start_step=first)
        losses, start_time = [], time.time()
        for step in range(first // args.num_envs, num_vector_steps):
            global_step = (step + 1) * args.num_envs
            epsilon = student_epsilon(args, step * args.num_envs)
            obs, is_reset, games = play_step(envs, student, rb, obs, is_reset, epsilon, game_stats, device)
            for score, length in games:
                writer.add_scalar("charts/episodic_return", score, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
                student_scores.append(float(score))
                recent_scores.append(float(score))

            if student_learns(args, global_step) and len(rb) >= refill:
                # One gradient step per `train_frequency` env steps, whatever the number of envs.
                online["pending_train_steps"] += args.num_envs
                while online["pending_train_steps"] >= args.train_frequency:
                    online["pending_train_steps"] -= args.train_frequency
                    if args.distillation:
                        online["distill_coeff"] = distill_coefficient(student_scores, teacher_return)
                    losses.append(gradient_step(rb, online["distill_coeff"]))
            if crossed(global_step, args.num_envs, args.target_network_frequency):
                target_network.load_state_dict(student.state_dict())
            # Logging, every 1,000 env steps.
            if crossed(global_step, args.num_envs, 1000) or step == num_vector_steps - 1:
                sps = (global_step - first) / (time.time() - start_time)
                if losses:
                    log_losses(writer, "", losses, global_step)
                    losses = []
                writer.add_scalar("charts/distill_coeff", online["distill_coeff"], global_step)
                writer.add_scalar("charts/epsilon", epsilon, global_step)
                writer.add_scalar("charts/learning_rate", args.learning_rate, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                progress.update(
                    global_step, sps, f"return(last 20 ep) {np.mean(recent_scores) if recent_scores else math.nan:8.2f}"
                )
            # Evaluation on its schedule (the last one follows the loop), an interrupt, a checkpoint.
            if step < num_vector_steps - 1:
                if args.eval_frequency and crossed(global_step, args.num_envs, args.eval_frequency):
                    label = f"step {global_step:,}: student"
                    evaluate_student(writer, "eval/episodic_return", global_step, f"eval_{global_step}", label)
            if interrupts.signal:
                return stop(3, global_step, rb)
            if checkpoint_due(global_step, args.total_timesteps, args.num_envs):
                save_checkpoint(3, global_step, rb)

        # The end: the final evaluation, the saved model and the finished run's checkpoint.
        final_step = num_vector_steps * args.num_envs
        evaluate_student(writer, "eval/episodic_return", final_step, f"eval_{final_step}", "student")
        if args.save_model:
            save_student()
        save_checkpoint(FINISHED, 0)
        return interrupts.status_at_the_end(run_dir)
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
                raise UsageError(
                    f"{args.resume}/checkpoint.pt is not a qdagger_dqn_atari_impalacnn.py training checkpoint"
                ) from None
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
