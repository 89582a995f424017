"""--capture-video: each script writes an MP4 of env 0's greedy evaluation episode, readable back."""

import glob
import os

import imageio.v2 as imageio
import numpy as np
from helpers import error_line, run_script
from test_rollout import SCRIPT, ObsValueQ, ScriptedEnvs

import pqn

TINY_PQN = ["--num-envs", "8", "--num-steps", "32", "--num-minibatches", "4", "--update-epochs", "1", "--eval-episodes", "2"]
TINY_ATARI = [
    *["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "1"],
    *["--total-timesteps", "64", "--eval-episodes", "2", "--eval-max-steps", "60"],
]


def read_video(path):
    """(number of frames, frame shape, fps) of an MP4, read back with imageio."""
    reader = imageio.get_reader(path)
    try:
        return reader.count_frames(), reader.get_data(0).shape, reader.get_meta_data()["fps"]
    finally:
        reader.close()


def test_evaluate_records_every_frame_of_env_0s_episode_and_no_more():
    # Env 0's first episode lasts 3 steps: the reset's frame and one after each of its 3 steps.
    envs = ScriptedEnvs(SCRIPT)
    frames = []
    returns = pqn.evaluate(ObsValueQ(), envs, seeds=None, record=lambda: frames.append(envs._obs()[0].copy()))
    assert [frame.tolist() for frame in frames] == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3]]
    assert returns[0] == np.float64(1.1 + 1.2 + 1.3)


def test_pqn_writes_a_video_at_each_evaluation_and_for_a_saved_model(tmp_path):
    flags = [*TINY_PQN, *"--total-timesteps 2048 --eval-frequency 1024 --save-model --capture-video --no-cuda".split()]
    result = run_script("pqn.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["eval_1024.mp4", "eval_2048.mp4"]
    frames, shape, fps = read_video(os.path.join(run_dir, "videos", "eval_2048.mp4"))
    assert 9 <= frames <= 501 and shape == (400, 600, 3) and fps == 50  # a CartPole episode: 8 to 500 steps
    evaluated = run_script(
        "pqn.py", "--eval-checkpoint", os.path.join(run_dir, "pqn.pt"), "--capture-video", "--no-cuda", cwd=tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr
    frames, shape, _ = read_video(os.path.join(run_dir, "videos", "pqn.mp4"))
    assert frames >= 9 and shape == (400, 600, 3)
    # A videos folder that cannot be written is one line before the evaluation, not after it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(os.path.join(run_dir, "pqn.pt"), elsewhere / "pqn.pt")
    (elsewhere / "videos").write_text("a file where the videos folder should be")
    line = error_line(run_script("pqn.py", "--eval-checkpoint", "elsewhere/pqn.pt", "--capture-video", cwd=tmp_path))
    assert line.startswith("error: cannot write to elsewhere/videos")


def test_atari_writes_full_colour_frames(tmp_path):
    result = run_script("pqn_atari_envpool.py", *TINY_ATARI, "--capture-video", "--no-cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "eval_64.mp4"))
    frames, shape, fps = read_video(path)
    assert frames > 1 and shape == (210, 160, 3) and fps == 15


def test_pdqn_writes_minatar_frames_drawn_large(tmp_path):
    flags = [*TINY_PQN, "--total-timesteps", "512", "--capture-video", "--no-cuda"]
    result = run_script("pdqn_minatar.py", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "videos" / "eval_512.mp4"))
    frames, shape, _ = read_video(path)
    assert frames > 1 and shape == (160, 160, 3)


def test_without_imageio_the_flag_is_one_clear_line(tmp_path, monkeypatch):
    # A module named imageio_ffmpeg that fails to import stands in for a missing plugin.
    (tmp_path / "imageio_ffmpeg.py").write_text("raise ImportError('no ffmpeg plugin')\n")
    paths = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    result = run_script("pqn.py", *TINY_PQN, "--capture-video", cwd=tmp_path)
    assert "--capture-video needs imageio and its ffmpeg plugin: pip install -r requirements/video.txt" in error_line(result)
    assert not (tmp_path / "runs").exists()


def test_the_recorder_writes_what_it_rendered_and_starts_afresh(tmp_path):
    colours = iter([0, 120, 250, 60])
    recorder = pqn.VideoRecorder(lambda: np.full((32, 48, 3), next(colours), dtype=np.uint8), fps=5)
    for _ in range(3):
        recorder()
    recorder.save(str(tmp_path / "videos" / "a.mp4"))
    assert recorder.frames == []
    reader = imageio.get_reader(str(tmp_path / "videos" / "a.mp4"))
    means = [frame.mean() for frame in reader]
    reader.close()
    assert len(means) == 3 and np.allclose(means, [0, 120, 250], atol=8)  # lossy H.264: about the colour
