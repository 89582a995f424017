"""qdagger_dqn_atari_impalacnn.py: the frame replay buffer, the distillation loss, the three phases, bad teachers."""

import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import tyro
from helpers import (
    ROOT,
    error_line,
    only_run_dir,
    read_scalars,
    record_scalars_and_checkpoints,
    run_script,
    run_script_interrupted_at,
)

import qdagger_dqn_atari_impalacnn as qd


def buffer_args(**overrides):
    args = qd.Args(teacher_model_path="unused.pt", max_episode_steps=70)
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


class RecordingEnvs:
    """Passes steps through to the envs and keeps each step's actions and results."""

    def __init__(self, envs):
        self.envs, self.action_space, self.steps = envs, envs.action_space, []

    def step(self, actions):
        out = self.envs.step(actions)
        self.steps.append((actions, *out))
        return out


class Zeros(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 4)


def fill_from_breakout(capacity, num_envs, num_steps, seed=0):
    """Random play (epsilon 1) on real Breakout through the script's play_step, and, naively, every
    real transition in full."""
    np.random.seed(seed)
    envs = RecordingEnvs(qd.make_atari_envs("Breakout-v5", list(range(seed, seed + num_envs)), 4, buffer_args()))
    rb = qd.FrameReplayBuffer(capacity, num_envs)
    naive = [[] for _ in range(num_envs)]
    obs, _ = envs.envs.reset()
    rb.observe(obs)
    is_reset = np.zeros(num_envs, dtype=bool)
    counts = {"real": 0, "reset": 0, "game_starts": 0, "truncated": 0}
    stats = qd.GameStats(num_envs)
    for _ in range(num_steps):
        next_obs, next_is_reset, _ = qd.play_step(envs, Zeros(), rb, obs, is_reset, 1.0, stats, "cpu")
        actions, _, rewards, term, trunc, info = envs.steps[-1]
        for n in range(num_envs):
            if not is_reset[n]:
                naive[n].append((obs[n], actions[n], rewards[n], next_obs[n], float(term[n])))
        counts["real"] += int((~is_reset).sum())
        counts["reset"] += int(is_reset.sum())
        counts["truncated"] += int(trunc.sum())
        counts["game_starts"] += int(((info["terminated"] == 1) | trunc).sum())
        assert np.array_equal(next_is_reset, term | trunc)
        is_reset, obs = next_is_reset, next_obs
    return rb, naive, counts


def test_buffer_rebuilds_exactly_the_observed_stacks_with_wraparound():
    rb, naive, counts = fill_from_breakout(capacity=3 * 120, num_envs=3, num_steps=400)
    assert counts["reset"] > 10 and counts["game_starts"] >= 3 and counts["truncated"] >= 1
    for n in range(3):
        stored = int(rb.head[n] - rb.tail[n])
        assert rb.head[n] == len(naive[n])  # every real step stored, no reset step
        assert 0.9 * rb.capacity <= stored <= rb.capacity  # wrapped around, nearly full
        indices = np.arange(rb.tail[n], rb.head[n])
        obs, actions, rewards, next_obs, terms = rb.transitions(np.full(stored, n), indices)
        expected = naive[n][-stored:]
        assert np.array_equal(obs, np.stack([e[0] for e in expected]))
        assert np.array_equal(next_obs, np.stack([e[3] for e in expected]))
        assert np.array_equal(actions, [e[1] for e in expected])
        assert np.array_equal(rewards, np.array([e[2] for e in expected], dtype=np.float32))
        assert np.array_equal(terms, [e[4] for e in expected])


def test_stacks_never_reach_across_a_new_game():
    rb, _, _ = fill_from_breakout(capacity=3 * 400, num_envs=3, num_steps=400, seed=1)
    new_games = lives_lost = 0
    for n in range(3):
        idx = np.arange(rb.tail[n], rb.head[n])
        obs, *_ = rb.transitions(np.full(len(idx), n), idx)
        for k in range(1, len(idx)):
            previous_next = rb.next_pos[n, idx[k - 1] % rb.capacity]
            this_obs = rb.obs_pos[n, idx[k] % rb.capacity]
            if this_obs == previous_next:
                continue  # the same episode goes on
            # A reset step (not stored) came between, acting on the final observation at previous_next.
            if this_obs - previous_next == 4:
                # A new game: a fresh stack of 4 frames after the final one, none from the game before
                # (envpool starts a game with its first frame four times).
                new_games += 1
                assert (obs[k] == obs[k][0]).all()
            else:
                # A lost life: envpool's stack goes on with one new frame, as the agent saw it.
                lives_lost += 1
                assert this_obs - previous_next == 1
    assert new_games >= 2 and lives_lost >= 4


def test_sample_draws_valid_transitions_uniformly():
    rb, naive, _ = fill_from_breakout(capacity=2 * 100, num_envs=2, num_steps=150, seed=2)
    obs, actions, rewards, next_obs, terms = rb.sample(4000, np.random.default_rng(0), "cpu")
    assert obs.shape == (4000, 4, 84, 84) and obs.dtype == torch.uint8 and actions.dtype == torch.int64
    # Every sampled transition is one of the stored ones (the next obs continues the obs or a new game starts).
    stored = {e[0][-1].tobytes() + e[3][-1].tobytes() for env in naive for e in env}
    assert all(o[-1].numpy().tobytes() + n[-1].numpy().tobytes() in stored for o, n in zip(obs[:200], next_obs[:200]))
    assert 0.3 < (actions == 0).float().mean() + (actions == 1).float().mean() < 0.7
    # Uniform over all stored transitions: each env in proportion to what it holds, old and new alike.
    drawn = []
    rb.transitions = lambda envs, indices: drawn.append((envs, indices)) or ((),) * 5
    rb.sample(200_000, np.random.default_rng(1), "cpu")
    (envs, indices), sizes = drawn[0], rb.head - rb.tail
    counts = np.zeros((2, sizes.max()))
    np.add.at(counts, (envs, indices - rb.tail[envs]), 1)
    for env in range(2):
        assert ((indices >= rb.tail[env]) & (indices < rb.head[env]))[envs == env].all()
        expected = 200_000 / sizes.sum()
        assert abs(counts[env, : sizes[env]].mean() - expected) < 0.02 * expected  # its share of the draws
        assert counts[env, : sizes[env]].std() < 0.05 * expected  # Poisson spread is 0.03 of the mean: none favoured


def test_one_million_transitions_fit_in_8_gb():
    for num_envs in (1, 8, 128):
        assert qd.FrameReplayBuffer.nbytes(1_000_000, num_envs) <= 8 * 10**9
    # The computed footprint is what the arrays really take.
    rb = qd.FrameReplayBuffer(1000, 4)
    arrays = [rb.frames, rb.obs_pos, rb.next_pos, rb.actions, rb.rewards, rb.terminations]
    assert sum(a.nbytes for a in arrays) == qd.FrameReplayBuffer.nbytes(1000, 4)


def test_distill_loss_matches_a_reference_and_is_a_batch_mean():
    g = torch.Generator().manual_seed(0)
    teacher_q, student_q = torch.randn(5, 6, generator=g) * 3, torch.randn(5, 6, generator=g) * 3
    for temperature in (1.0, 0.5):
        expected = 0.0
        for i in range(5):
            p = torch.softmax(teacher_q[i] / temperature, 0)
            q = torch.softmax(student_q[i] / temperature, 0)
            expected += sum(p[a] * torch.log(p[a] / q[a]) for a in range(6)).item() / 5
        assert qd.distill_loss(teacher_q, student_q, temperature).item() == pytest.approx(expected, rel=1e-5)
    doubled = qd.distill_loss(teacher_q.repeat(2, 1), student_q.repeat(2, 1), 1.0)
    assert doubled.item() == pytest.approx(qd.distill_loss(teacher_q, student_q, 1.0).item(), rel=1e-6)
    assert qd.distill_loss(teacher_q, teacher_q, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_coefficient():
    assert qd.distill_coefficient([5.0] * 9, 10.0) == 1.0  # too few games yet
    assert qd.distill_coefficient([5.0] * 10, 10.0) == pytest.approx(0.5)
    assert qd.distill_coefficient([2.0, 4.0] * 5, 12.0) == pytest.approx(0.75)
    assert qd.distill_coefficient([15.0] * 10, 10.0) == 0.0  # the student beat the teacher
    assert qd.distill_coefficient([0.0] * 10, 0.0) == 0.0  # a teacher that scores nothing
    assert qd.distill_coefficient([-5.0] * 10, -2.0) == 1.0


def test_td_target_bootstraps_unless_terminated():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[1.0, 3.0], [2.0, 0.5]])

    target = qd.td_target(Fixed(), torch.tensor([1.0, 1.0]), torch.zeros(2, 4, 84, 84), torch.tensor([0.0, 1.0]), 0.9)
    torch.testing.assert_close(target, torch.tensor([1.0 + 0.9 * 3.0, 1.0]))


def test_impala_student_shapes():
    q = qd.ImpalaQNetwork(6)(torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8))
    assert q.shape == (2, 6)


TINY = (
    "--teacher-steps 64 --offline-steps 20 --offline-eval-frequency 10 --total-timesteps 120 "
    "--learning-starts 40 --buffer-size 200 --num-envs 2 --eval-episodes 1 --eval-max-steps 30 "
    "--teacher-eval-episodes 1 --max-episode-steps 40 --target-network-frequency 16 "
    "--batch-size 8 --no-cuda"
).split()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("teacher")
    flags = "--num-envs 4 --num-steps 16 --num-minibatches 2 --total-timesteps 64 --eval-episodes 1 --eval-max-steps 30"
    result = run_script("pqn_atari_envpool.py", *flags.split(), "--save-model", "--no-cuda", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return os.path.join(only_run_dir(cwd), "pqn_atari_envpool.pt")


def test_three_phases_log_their_metrics(teacher, tmp_path):
    result = run_script("qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", teacher, *TINY, "--save-model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "replay buffers: teacher" in result.stdout and "(1 games)" in result.stdout.splitlines()[0]
    run_dir = only_run_dir(tmp_path)
    scalars = {
        **read_scalars(run_dir),
        **read_scalars(os.path.join(run_dir, "teacher")),
        **read_scalars(os.path.join(run_dir, "offline")),
    }
    expected = {
        "charts/teacher/avg_episodic_return",
        "charts/teacher/SPS",  # teacher evaluation and phase 1
        "losses/offline/td_loss",
        "losses/offline/distill_loss",
        "charts/offline/avg_episodic_return",
        "charts/offline/SPS",
        "losses/td_loss",
        "losses/distill_loss",
        "losses/q_values",
        "charts/distill_coeff",
        "charts/SPS",
        "charts/epsilon",
        "charts/learning_rate",
        "eval/episodic_return",
        "charts/episodic_return",
        "charts/episodic_length",
    }
    assert expected <= set(scalars), expected - set(scalars)
    assert [s for s, _ in scalars["charts/offline/avg_episodic_return"]] == [10, 20]
    assert all(v == 1.0 for _, v in scalars["charts/distill_coeff"])  # fewer than 10 student games
    saved = torch.load(os.path.join(run_dir, "qdagger_dqn_atari_impalacnn.pt"), weights_only=True)
    assert saved["format"] == qd.STUDENT_FORMAT and saved["env_id"] == "Breakout-v5"
    qd.ImpalaQNetwork(saved["num_actions"]).load_state_dict(saved["student"])
    # The saved student evaluates from the command line; another --env-id is one clear line.
    path = os.path.relpath(os.path.join(run_dir, "qdagger_dqn_atari_impalacnn.pt"), tmp_path)
    result = run_script(
        "qdagger_dqn_atari_impalacnn.py",
        "--eval-checkpoint",
        path,
        "--eval-episodes",
        "1",
        "--eval-max-steps",
        "30",
        "--no-cuda",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Breakout-v5: greedy score over 1 games" in result.stdout
    # The run's final checkpoint.pt holds the same student: it evaluates the same.
    flags = ["--eval-episodes", "1", "--eval-max-steps", "30", "--no-cuda"]
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    from_checkpoint = run_script("qdagger_dqn_atari_impalacnn.py", "--eval-checkpoint", checkpoint_path, *flags, cwd=tmp_path)
    assert from_checkpoint.returncode == 0, from_checkpoint.stderr
    assert from_checkpoint.stdout == result.stdout
    line = error_line(
        run_script("qdagger_dqn_atari_impalacnn.py", "--eval-checkpoint", path, "--env-id", "Pong-v5", cwd=tmp_path)
    )
    assert "was trained on Breakout-v5, not Pong-v5" in line


def test_capture_video_records_the_students_evaluations(teacher, tmp_path):
    result = run_script(
        "qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", teacher, *TINY, "--capture-video", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    videos = os.path.join(only_run_dir(tmp_path), "videos")
    assert sorted(os.listdir(videos)) == ["eval_120.mp4", "offline_10.mp4", "offline_20.mp4"]
    reader = imageio.get_reader(os.path.join(videos, "eval_120.mp4"))
    assert reader.count_frames() > 1 and reader.get_data(0).shape == (210, 160, 3)
    reader.close()


def test_sigint_in_the_online_phase_saves_the_student_and_exits_with_one_line(teacher, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    flags = [*TINY, "--total-timesteps", "1000000", "--save-model"]
    script = os.path.join(ROOT, "qdagger_dqn_atari_impalacnn.py")
    process = subprocess.Popen(
        [sys.executable, script, "--teacher-model-path", teacher, *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:  # phase 2 ends with its evaluation at offline step 20
        if line.startswith("phase 2: step 20:"):
            break
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (
        "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1 and "SIGINT: stopped in phase 3 at step" in stderr
    ), stderr
    saved = torch.load(os.path.join(only_run_dir(tmp_path), "qdagger_dqn_atari_impalacnn.pt"), weights_only=True)
    assert saved["format"] == qd.STUDENT_FORMAT


def test_bad_or_mismatched_teacher_gives_one_clear_line(teacher, tmp_path):
    line = error_line(run_script("qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", "missing.pt", *TINY, cwd=tmp_path))
    assert "no teacher at missing.pt" in line and "python pqn_atari_envpool.py --env-id Breakout-v5 --save-model" in line
    line = error_line(run_script("qdagger_dqn_atari_impalacnn.py", *TINY, cwd=tmp_path))
    assert "--teacher-model-path is required" in line

    # The other teachers in process: the script turns each UsageError into its one line, as above.
    def refused(path, env_id="Breakout-v5"):
        with pytest.raises(qd.UsageError) as error:
            qd.load_teacher(str(path), env_id, 4, torch.device("cpu"))
        return str(error.value)

    message = refused(teacher, "Pong-v5")
    assert "was trained on Breakout-v5, this run is Pong-v5" in message and "--env-id Pong-v5 --save-model" in message
    torch.save({"q_network": {}}, tmp_path / "other.pt")
    assert "other.pt is not a pqn_atari_envpool.py checkpoint" in refused(tmp_path / "other.pt")
    torch.save({"format": qd.TEACHER_FORMAT}, tmp_path / "only_format.pt")
    assert "only_format.pt is not a pqn_atari_envpool.py checkpoint" in refused(tmp_path / "only_format.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert "garbage.pt is not a torch checkpoint" in refused(tmp_path / "garbage.pt")
    checkpoint = torch.load(teacher, weights_only=True)
    checkpoint["q_network"] = {k: v[..., :1] if v.ndim else v for k, v in checkpoint["q_network"].items()}
    torch.save(checkpoint, tmp_path / "broken.pt")
    assert "does not fit the Q-network" in refused(tmp_path / "broken.pt")
    checkpoint["num_actions"] = 6
    torch.save(checkpoint, tmp_path / "six_actions.pt")
    assert "has 6 actions and observations [4, 84, 84], Breakout-v5 has 4" in refused(tmp_path / "six_actions.pt")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
        (["--buffer-size", "100000000000"], "the larger replay buffer (--buffer-size, --teacher-steps) and the envs"),
        (["--batch-size", "4096", "--buffer-size", "1024"], "--batch-size 4096 is larger than the replay buffers"),
        (["--total-timesteps", "1"], "--total-timesteps 1 is not one step of every env (--num-envs 2)"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(
        run_script("qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", "teacher.pt", *TINY, *flags, cwd=tmp_path)
    )
    assert line.startswith("error: ") and message in line


def test_evaluating_a_saved_student_needs_no_memory_for_replay_buffers():
    huge = {"buffer_size": 10**11, "teacher_steps": 10**11}
    with pytest.raises(qd.UsageError, match="the larger replay buffer"):
        qd.finalize_args(qd.Args(teacher_model_path="teacher.pt", **huge))
    assert qd.finalize_args(qd.Args(eval_checkpoint="student.pt", **huge)).eval_checkpoint == "student.pt"


def test_a_diverging_student_stops_at_the_first_non_finite_loss(teacher, tmp_path):
    line = error_line(
        run_script(
            "qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", teacher, *TINY, "--learning-rate", "1e30", cwd=tmp_path
        )
    )
    assert "a loss or mean Q is not finite at offline gradient step" in line


def test_teacher_epsilon_decays_over_all_of_phase_1():
    args = qd.Args(teacher_steps=500_000, start_e=1.0, end_e=0.01)
    assert qd.teacher_epsilon(args, 0) == 1.0
    assert qd.teacher_epsilon(args, 250_000) == pytest.approx(0.505)
    assert qd.teacher_epsilon(args, 499_999) == pytest.approx(0.01, abs=1e-5)


def test_the_online_phase_continues_the_offline_phase_schedules():
    args = qd.Args(offline_steps=500_000, total_timesteps=10_000_000, exploration_fraction=0.1, learning_starts=80_000)
    assert qd.student_epsilon(args, 0) == pytest.approx(0.505)  # not 1.0: half of the decay is behind it
    assert qd.student_learns(args, 1)  # from its first step: the offline steps are past learning_starts
    short = qd.Args(offline_steps=5_000, learning_starts=80_000)
    assert not qd.student_learns(short, 75_000) and qd.student_learns(short, 75_001)


def test_the_script_logs_the_continued_schedule(teacher, tmp_path):
    # epsilon decays over all 120 steps: at step 118 it is 0.0265 on a clock from 0, 0.01 on one from 20.
    result = run_script(
        "qdagger_dqn_atari_impalacnn.py", "--teacher-model-path", teacher, *TINY, "--exploration-fraction", "1.0", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    args = qd.Args(offline_steps=20, total_timesteps=120, learning_starts=40, exploration_fraction=1.0)
    step, epsilon = read_scalars(only_run_dir(tmp_path))["charts/epsilon"][-1]
    assert step == 120 and epsilon == pytest.approx(qd.student_epsilon(args, 118)) == 0.01


def trained_student(teacher, tmp_path, monkeypatch, capsys, *flags):
    """The student after phase 2 of a tiny run, trained in this process."""
    tmp_path.mkdir()
    flags = ["--teacher-model-path", teacher, *TINY, "--total-timesteps", "0", "--save-model", *flags]
    status, _ = main_in_process(monkeypatch, tmp_path, flags)
    assert status == 0 and "phase 2: step 20: student: greedy score" in capsys.readouterr().out
    return torch.load(os.path.join(only_run_dir(tmp_path), "qdagger_dqn_atari_impalacnn.pt"), weights_only=True)["student"]


def test_without_distillation_the_distillation_term_is_zero(teacher, tmp_path, monkeypatch, capsys):
    """The temperature acts only through the distillation term: without it, students trained with
    different temperatures are the same; with it, they differ."""
    runs = {}
    for distill in ["--distillation", "--no-distillation"]:
        for temperature in ["1.0", "0.1"]:
            runs[distill, temperature] = trained_student(
                teacher, tmp_path / f"{distill}{temperature}", monkeypatch, capsys, distill, "--temperature", temperature
            )
    for name, value in runs["--no-distillation", "1.0"].items():
        torch.testing.assert_close(runs["--no-distillation", "0.1"][name], value)
    assert any(not torch.allclose(runs["--distillation", "0.1"][k], v) for k, v in runs["--distillation", "1.0"].items())


def test_the_replay_buffer_survives_a_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    rb = qd.FrameReplayBuffer(40, 2)
    rb.observe(rng.integers(0, 255, (2, 4, 84, 84), dtype=np.uint8))
    for _ in range(30):
        rb.add(
            rng.integers(0, 4, 2),
            rng.normal(size=2),
            rng.random(2) < 0.1,
            rng.integers(0, 255, (2, 4, 84, 84), dtype=np.uint8),
            rng.random(2) < 0.9,
        )
    torch.save(rb.state_dict(), tmp_path / "rb.pt")
    restored = qd.FrameReplayBuffer(40, 2)
    restored.load_state_dict(torch.load(tmp_path / "rb.pt", weights_only=True))
    assert len(restored) == len(rb)
    for a, b in zip(rb.sample(16, np.random.default_rng(1), "cpu"), restored.sample(16, np.random.default_rng(1), "cpu")):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(restored.last_obs, rb.last_obs)


def run_until(teacher, cwd, flags, line_start, delay=0.0, signum=signal.SIGKILL):
    """Starts a QDagger run, sends `signum` once a line starting with `line_start` is printed (after
    `delay` seconds); returns the process's exit status and stderr."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "qdagger_dqn_atari_impalacnn.py")
    process = subprocess.Popen(
        [sys.executable, script, "--teacher-model-path", teacher, *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith(line_start):
            break
    time.sleep(delay)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def steps_of(scalars, tag):
    return [step for step, _ in scalars[tag]]


def test_a_run_killed_in_phase_2_resumes_with_a_refilled_teacher_buffer(teacher, tmp_path):
    flags = [*TINY, "--offline-steps", "200", "--offline-eval-frequency", "100", "--checkpoint-frequency", "50"]
    returncode, _ = run_until(teacher, tmp_path, flags, "phase 2: step 100:")
    assert returncode == -signal.SIGKILL
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert saved["phase"] == 2 and saved["phase_step"] in (50, 100, 150) and saved["buffer"] is None  # the kill lands late
    result = run_script("qdagger_dqn_atari_impalacnn.py", "--resume", os.path.relpath(run_dir, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "teacher transitions in" in result.stdout.split("phase 2:")[0]  # refilled before learning again
    offline = read_scalars(os.path.join(run_dir, "offline"))
    assert steps_of(offline, "losses/offline/td_loss") == [100, 200]  # each step once
    assert steps_of(offline, "charts/offline/avg_episodic_return") == [100, 200]
    teacher_log = read_scalars(os.path.join(run_dir, "teacher"))
    assert steps_of(teacher_log, "charts/teacher/avg_episodic_return") == [0]  # phase 1's log is left alone
    online = read_scalars(run_dir)
    assert steps_of(online, "charts/SPS")[-1] == 120 and steps_of(online, "eval/episodic_return") == [120]
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["phase"] == qd.FINISHED
    again = run_script("qdagger_dqn_atari_impalacnn.py", "--resume", os.path.relpath(run_dir, tmp_path), cwd=tmp_path)
    assert again.returncode == 0 and "is finished: nothing to resume" in again.stdout


def main_in_process(monkeypatch, tmp_path, flags, stop_in=None, resume=None):
    """Runs QDagger's main in this process (with `--resume`, as the command line would); with `stop_in`
    = (function, call), tells it to stop (as SIGINT would) in the `call`-th call of the module's
    `function`: a signal timed to a step exactly, on any machine. Returns main's exit status and the
    SummaryWriters it made."""
    interrupts, writers, calls = [], [], []

    class RecordedInterrupts(qd.Interrupts):
        def __init__(self):
            self.signal = None  # no handlers: pytest keeps its own
            interrupts.append(self)

    class RecordedWriter(qd.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            writers.append(self)

    if stop_in:
        function, call = stop_in
        original = getattr(qd, function)

        def then_stop(*args):
            calls.append(None)
            if len(calls) == call:
                interrupts[-1].signal = signal.SIGINT
            return original(*args)

        monkeypatch.setattr(qd, function, then_stop)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(qd, "Interrupts", RecordedInterrupts)
    monkeypatch.setattr(qd, "SummaryWriter", RecordedWriter)
    monkeypatch.setattr(torch, "set_flush_denormal", lambda _: True)  # this process's arithmetic stays as it is
    args, given, state = tyro.cli(qd.Args, args=flags), qd.flags_given(flags), None
    if resume:
        state = qd.load_training_state(resume)
        args = qd.resumed_args(args, given, state["args"])
    return qd.main(qd.finalize_args(args), given, state), writers


def test_an_interrupt_in_phase_2_and_another_while_its_buffer_is_refilled_leave_the_run_where_it_was(
    teacher, tmp_path, monkeypatch, capsys
):
    # td_target is called once per gradient step: stopped at offline step 100, then, resumed (without
    # its buffer: the teacher plays phase 1 again), stopped in the 5th step of that refill.
    flags = ["--teacher-model-path", teacher, *TINY, "--offline-steps", "200", "--offline-eval-frequency", "100"]
    status, _ = main_in_process(monkeypatch, tmp_path, flags, stop_in=("td_target", 100))
    assert status == 130 and "SIGINT: stopped in phase 2 at step 100;" in capsys.readouterr().err
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (saved["phase"], saved["phase_step"], saved["buffer"]) == (2, 100, None)
    # Everything phase 2 logged up to its checkpoint is in its event file.
    assert steps_of(read_scalars(os.path.join(run_dir, "offline")), "losses/offline/td_loss") == [100]
    status, _ = main_in_process(monkeypatch, tmp_path, [], stop_in=("play_step", 5), resume=os.path.relpath(run_dir, tmp_path))
    assert status == 130 and "SIGINT: stopped in phase 2 at step 100;" in capsys.readouterr().err
    stopped = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (stopped["phase"], stopped["phase_step"], stopped["buffer"]) == (2, 100, None)
    torch.testing.assert_close(stopped["student"], saved["student"])


def test_an_interrupt_in_phase_3_saves_the_buffer_and_the_run_resumes_from_it(teacher, tmp_path, monkeypatch, capsys):
    flags = ["--teacher-model-path", teacher, *TINY, "--total-timesteps", "300", "--train-frequency", "8"]
    # student_epsilon is called once per vector step of phase 3: stopped after its 40th (env step 80).
    status, _ = main_in_process(monkeypatch, tmp_path, [*flags, "--checkpoint-buffers"], stop_in=("student_epsilon", 40))
    stderr = capsys.readouterr().err
    assert (
        status == 130
        and stderr.strip()
        == f"SIGINT: stopped in phase 3 at step 80; continue with `python "
        f"qdagger_dqn_atari_impalacnn.py --resume {os.path.relpath(only_run_dir(tmp_path), tmp_path)}`"
    )
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert saved["phase"] == 3 and saved["phase_step"] == 80
    assert (
        saved["buffer"] is not None
        and int((saved["buffer"]["head"] - saved["buffer"]["tail"]).sum()) == saved["buffer_len"] > 0
    )
    result = run_script("qdagger_dqn_atari_impalacnn.py", "--resume", os.path.relpath(run_dir, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = steps_of(read_scalars(run_dir), "charts/SPS")
    assert steps == sorted(set(steps)) and steps[-1] == 300
    assert "phase 1:" not in result.stdout and "phase 2:" not in result.stdout  # straight back into phase 3


def test_an_interrupt_at_the_last_offline_step_resumes_in_phase_3_and_closes_every_writer(
    teacher, tmp_path, monkeypatch, capsys
):
    # td_target is called once per gradient step: its 20th call is phase 2's last step (--offline-steps 20).
    status, writers = main_in_process(
        monkeypatch, tmp_path, ["--teacher-model-path", teacher, *TINY], stop_in=("td_target", 20)
    )
    assert status == 128 + signal.SIGINT
    assert "SIGINT: stopped in phase 3 at step 0" in capsys.readouterr().err
    assert len(writers) == 3 and all(w.all_writers is None for w in writers)  # phases 3, 1 and 2: all closed
    run_dir = only_run_dir(tmp_path)
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (saved["phase"], saved["phase_step"], saved["buffer"], saved["buffer_len"]) == (3, 0, None, 0)
    assert steps_of(read_scalars(os.path.join(run_dir, "offline")), "charts/offline/avg_episodic_return") == [10, 20]

    result = run_script("qdagger_dqn_atari_impalacnn.py", "--resume", os.path.relpath(run_dir, tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "teacher transitions in" not in result.stdout and "phase 2:" not in result.stdout  # no refill, no replay
    assert steps_of(read_scalars(os.path.join(run_dir, "offline")), "charts/offline/avg_episodic_return") == [10, 20]
    assert steps_of(read_scalars(run_dir), "eval/episodic_return") == [120]
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["phase"] == qd.FINISHED


@pytest.mark.parametrize(
    "total_timesteps, function, call",
    [
        (120, "evaluate_student", 3),  # offline evaluations at steps 10 and 20, then the final one
        (0, "save_student", 1),  # no phase 3: the run ends with phase 2
    ],
)
def test_a_signal_after_the_last_step_lets_the_run_finish_and_says_so(teacher, tmp_path, total_timesteps, function, call):
    flags = ["--teacher-model-path", teacher, *TINY, "--total-timesteps", str(total_timesteps), "--save-model"]
    result = run_script_interrupted_at("qdagger_dqn_atari_impalacnn.py", function, call, *flags, cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert result.returncode == 130, result.stderr
    assert error_line(result) == (
        f"SIGINT came after the last step: the run finished, its results are in {os.path.relpath(run_dir, tmp_path)}"
    )
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["phase"] == qd.FINISHED
    assert os.path.isfile(os.path.join(run_dir, "qdagger_dqn_atari_impalacnn.pt"))
    if total_timesteps:
        assert steps_of(read_scalars(run_dir), "eval/episodic_return") == [total_timesteps]


def test_a_run_resumes_with_its_teacher_moved_but_not_with_another_teacher(teacher, tmp_path, monkeypatch):
    # td_target is called once per gradient step: its 20th call is phase 2's last step (--offline-steps 20).
    status, _ = main_in_process(monkeypatch, tmp_path, ["--teacher-model-path", teacher, *TINY], stop_in=("td_target", 20))
    assert status == 130
    run_dir = os.path.relpath(only_run_dir(tmp_path), tmp_path)
    moved = tmp_path / "moved.pt"
    shutil.copy(teacher, moved)
    other = torch.load(teacher, weights_only=True)
    other["q_network"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in other["q_network"].items()}
    torch.save(other, tmp_path / "other.pt")
    line = error_line(
        run_script("qdagger_dqn_atari_impalacnn.py", "--resume", run_dir, "--teacher-model-path", "other.pt", cwd=tmp_path)
    )
    assert line == "error: the teacher at other.pt is not the one the resumed run was trained with"
    result = run_script(
        "qdagger_dqn_atari_impalacnn.py", "--resume", run_dir, "--teacher-model-path", str(moved), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert torch.load(os.path.join(tmp_path, run_dir, "checkpoint.pt"), weights_only=True)["phase"] == qd.FINISHED


def test_what_each_phase_logged_up_to_a_checkpoint_is_on_disk_before_it_is_written(teacher, tmp_path, monkeypatch):
    # A run killed right after a checkpoint resumes from it and purges what was logged after it.
    monkeypatch.chdir(tmp_path)
    checkpoints = record_scalars_and_checkpoints(monkeypatch, qd)
    flags = ["--teacher-model-path", teacher, *TINY, "--checkpoint-frequency", "10"]
    assert qd.main(qd.finalize_args(tyro.cli(qd.Args, args=flags)), set()) in (None, 0)
    # Every 10 steps within a phase: 6 in phase 1 (64 teacher steps), 1 in phase 2 (20 offline steps),
    # 11 in phase 3 (120 steps); then the finished run's.
    assert len(checkpoints) == 6 + 1 + 11 + 1 and checkpoints[0][0] > 0
    # Flushed, rather than written by the writer's thread in time: on disk on a slower machine too.
    assert all(on_disk == given and unflushed == 0 for given, on_disk, unflushed in checkpoints), checkpoints


def test_resume_bad_input_is_one_line(teacher, tmp_path):
    line = error_line(run_script("qdagger_dqn_atari_impalacnn.py", "--resume", "runs/nothing", cwd=tmp_path))
    assert "no checkpoint at runs/nothing/checkpoint.pt" in line
    os.makedirs(tmp_path / "runs" / "broken")
    torch.save({"format": qd.CHECKPOINT_FORMAT}, tmp_path / "runs" / "broken" / "checkpoint.pt")
    line = error_line(run_script("qdagger_dqn_atari_impalacnn.py", "--resume", "runs/broken", cwd=tmp_path))
    assert "is not a qdagger_dqn_atari_impalacnn.py training checkpoint" in line
