"""Long runs survive faults: checkpoints and --resume, interrupts, non-finite losses, bad input, runs
beside each other (the PQN-family scripts; QDagger's resume and interrupts are in test_qdagger.py)."""

import errno
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import gymnasium as gym
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

import pdqn_minatar as pdqn
import pqn
import pqn_atari_envpool as atari
import pqn_atari_envpool_lstm as lstm
import qdagger_dqn_atari_impalacnn as qd

# 256 env steps per iteration, 40 iterations; a checkpoint every 4 iterations.
FLAGS = "--num-envs 8 --num-steps 32 --num-minibatches 4 --update-epochs 2 --eval-episodes 2 --no-cuda".split()
TOTAL, BATCH, EVERY = 10_240, 256, 1_024
# Atari: 64 env steps per iteration, 24 iterations; a checkpoint every 4 iterations.
ATARI_FLAGS = (
    "--num-envs 4 --num-steps 16 --num-minibatches 2 --update-epochs 2 --eval-episodes 2 --eval-max-steps 200 --no-cuda"
).split()
ATARI_TOTAL, ATARI_BATCH, ATARI_EVERY = 1_536, 64, 256
# script: (module, flags, total steps, steps per iteration, checkpoint frequency, RAdam steps after n iterations)
SCRIPTS = {
    "pqn.py": (pqn, FLAGS, TOTAL, BATCH, EVERY, lambda n: n * 2 * 4),
    "pqn_atari_envpool.py": (atari, ATARI_FLAGS, ATARI_TOTAL, ATARI_BATCH, ATARI_EVERY, lambda n: n * 2 * 2),
    "pqn_atari_envpool_lstm.py": (lstm, ATARI_FLAGS, ATARI_TOTAL, ATARI_BATCH, ATARI_EVERY, lambda n: n * 2 * 2),
    # MinAtar in async env workers: 8 envs x 32 steps; from the 3rd update on, one more step on the
    # 8 transitions of the one imagined step.
    "pdqn_minatar.py": (
        pdqn,
        [*FLAGS, "--vectorization", "async", "--planning-steps", "1", "--planning-delay-updates", "3"],
        6_144,
        BATCH,
        EVERY,
        lambda n: n * 2 * 4 + max(n - 2, 0),
    ),
}


def start_script(*flags, cwd, script="pqn.py"):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(cwd, min_step, process, timeout=120):
    """The run directory once its checkpoint.pt holds `min_step` env steps or more."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        paths = (
            [os.path.join(cwd, "runs", d, "checkpoint.pt") for d in os.listdir(os.path.join(cwd, "runs"))]
            if os.path.isdir(os.path.join(cwd, "runs"))
            else []
        )
        if paths and os.path.isfile(paths[0]):
            try:  # written atomically, so it is whole whenever it is there
                if torch.load(paths[0], weights_only=True)["global_step"] >= min_step:
                    return os.path.dirname(paths[0])
            except FileNotFoundError:
                pass
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of step {min_step} after {timeout} s")


@pytest.fixture(scope="module", params=list(SCRIPTS))
def killed_and_resumed(request, tmp_path_factory):
    script = request.param
    _, flags, total, _, every, _ = SCRIPTS[script]
    cwd = tmp_path_factory.mktemp("resume")
    process = start_script(
        *flags, "--total-timesteps", str(total), "--checkpoint-frequency", str(every), cwd=cwd, script=script
    )
    run_dir = wait_for_checkpoint(cwd, 2 * every, process)
    process.kill()  # SIGKILL: nothing of the run gets to react
    process.communicate()
    saved = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    shutil.copy(os.path.join(run_dir, "checkpoint.pt"), os.path.join(cwd, "killed_checkpoint.pt"))
    result = run_script(script, "--resume", os.path.relpath(run_dir, cwd), "--no-cuda", cwd=cwd)
    assert result.returncode == 0, result.stderr
    final = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    return script, run_dir, saved, final


def test_a_killed_run_resumes_to_the_same_total_step_count(killed_and_resumed):
    script, run_dir, saved, final = killed_and_resumed
    _, _, total, batch, every, grad_steps = SCRIPTS[script]
    assert saved["global_step"] >= 2 * every and saved["global_step"] < total
    assert final["global_step"] == total and final["iteration"] == total // batch
    # RAdam's step count went on from the checkpoint: one step per minibatch of every iteration.
    assert final["optimizer"]["t"].item() == grad_steps(total // batch)
    assert saved["optimizer"]["t"].item() == grad_steps(saved["iteration"])


def test_resumed_logs_continue_without_overlap_and_with_the_schedules(killed_and_resumed):
    script, run_dir, saved, _ = killed_and_resumed
    module, _, total, batch, _, _ = SCRIPTS[script]
    scalars = read_scalars(run_dir)
    # What the killed run logged after its checkpoint is purged: every iteration appears once.
    assert [s for s, _ in scalars["losses/td_loss"]] == list(range(batch, total + 1, batch))
    episode_steps = [s for s, _ in scalars["charts/episodic_return"]]
    assert episode_steps == sorted(episode_steps)
    args = module.finalize_args(
        module.Args(**{k: v for k, v in saved["args"].items() if k not in ("batch_size", "minibatch_size", "num_iterations")})
    )
    for step, lr in scalars["charts/learning_rate"]:
        iteration = step // batch
        assert lr == pytest.approx(args.learning_rate * (1.0 - (iteration - 1.0) / args.num_iterations))
    for step, epsilon in scalars["charts/epsilon"]:
        assert epsilon == pytest.approx(
            module.linear_schedule(args.start_e, args.end_e, args.exploration_fraction * total, step - batch)
        )
    assert len(scalars["eval/episodic_return"]) == 1


def test_a_run_resumed_from_behind_what_it_logged_logs_each_step_once(killed_and_resumed, tmp_path):
    # The resumed run's event files hold every step to the end. Resumed once more from the killed
    # run's checkpoint, it redoes steps already logged: they must replace the logged ones, not add to them.
    script, run_dir, saved, _ = killed_and_resumed
    _, _, total, batch, _, _ = SCRIPTS[script]
    copy = shutil.copytree(run_dir, tmp_path / "run")
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(run_dir)), "killed_checkpoint.pt"), copy / "checkpoint.pt")
    result = run_script(script, "--resume", "run", "--no-cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.listdir(tmp_path) == ["run"]  # the run continued in the folder given, under its new name
    scalars = read_scalars(str(copy))
    assert [s for s, _ in scalars["losses/td_loss"]] == list(range(batch, total + 1, batch))
    assert [s for s, _ in scalars["eval/episodic_return"]] == [total]
    episode_steps = [s for s, _ in scalars["charts/episodic_return"]]
    assert episode_steps == sorted(episode_steps)


def test_a_finished_run_says_so(killed_and_resumed):
    script, run_dir, _, _ = killed_and_resumed
    total = SCRIPTS[script][2]
    result = run_script(script, "--resume", run_dir, "--no-cuda", cwd=os.path.dirname(os.path.dirname(run_dir)))
    assert result.returncode == 0 and f"is finished (step {total:,} of {total:,}): nothing to resume" in result.stdout


# One iteration, long enough that a signal sent once the run has begun lands inside it.
ATARI_ONE_ITERATION = "--num-envs 4 --num-steps 256 --num-minibatches 2 --total-timesteps 1024 --eval-max-steps 200"
ONE_ITERATION = {
    "pqn.py": "--num-envs 8 --num-steps 2048 --num-minibatches 4 --total-timesteps 16384",
    "pqn_atari_envpool.py": ATARI_ONE_ITERATION,
    "pqn_atari_envpool_lstm.py": ATARI_ONE_ITERATION,
    "pdqn_minatar.py": "--num-envs 8 --num-steps 256 --num-minibatches 4 --total-timesteps 2048",
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("script", list(ONE_ITERATION))
def test_a_run_stopped_in_its_last_iteration_resumes_to_its_final_evaluation(tmp_path, script, device):
    flags = [*ONE_ITERATION[script].split(), "--update-epochs", "1", "--eval-episodes", "2"]
    total = int(flags[flags.index("--total-timesteps") + 1])
    # On the GPU, the resumed run loads its checkpoint and random states where it runs.
    env = dict(os.environ, OMP_NUM_THREADS="1") | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    device_flags = ["--no-cuda"] if device == "cpu" else []
    command = [sys.executable, os.path.join(ROOT, script)]
    process = subprocess.Popen(
        [*command, *flags, *device_flags], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    runs, deadline = tmp_path / "runs", time.time() + 120
    while not (runs.is_dir() and any(f.startswith("events") for d in runs.iterdir() for f in os.listdir(d))):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    run_dir = only_run_dir(tmp_path)
    stopped = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert stopped["global_step"] == total and not stopped["finished"]
    assert "eval/episodic_return" not in read_scalars(run_dir)
    # The run still owes its final evaluation: --resume gives it, and only then is the run finished.
    resumed = subprocess.run(
        [*command, "--resume", os.path.relpath(run_dir, tmp_path), *device_flags],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in read_scalars(run_dir)["eval/episodic_return"]] == [total]
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["finished"]


@pytest.mark.parametrize("script", list(ONE_ITERATION))
def test_a_signal_during_the_final_evaluation_lets_the_run_finish_and_says_so(tmp_path, script):
    # The run has taken its last step: it finishes its evaluation and saves, then tells of the signal.
    flags = [*ONE_ITERATION[script].split(), "--update-epochs", "1", "--eval-episodes", "2", "--save-model"]
    total = int(flags[flags.index("--total-timesteps") + 1])
    result = run_script_interrupted_at(script, "run_evaluation", 1, *flags, cwd=tmp_path)  # one iteration: the final one
    run_dir = only_run_dir(tmp_path)
    assert result.returncode == 130, result.stderr
    assert error_line(result) == (
        f"SIGINT came after the last step: the run finished, its results are in {os.path.relpath(run_dir, tmp_path)}"
    )
    assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["finished"]
    assert [s for s, _ in read_scalars(run_dir)["eval/episodic_return"]] == [total]
    assert os.path.isfile(os.path.join(run_dir, script.replace(".py", ".pt")))
    resumed = run_script(script, "--resume", os.path.relpath(run_dir, tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0 and "is finished" in resumed.stdout, resumed.stderr


def test_ctrl_c_while_a_saved_model_is_evaluated_is_one_line(tmp_path):
    assert run_script("pqn.py", *FLAGS, "--total-timesteps", "512", "--save-model", cwd=tmp_path).returncode == 0
    model = os.path.join(only_run_dir(tmp_path), "pqn.pt")
    result = run_script_interrupted_at("pqn.py", "evaluate", 1, "--eval-checkpoint", model, cwd=tmp_path)
    assert result.returncode == 130
    assert error_line(result) == "SIGINT: stopped, nothing saved"


def test_a_tracked_run_resumes_its_own_wandb_run(tmp_path):
    # A stand-in for wandb that records how each run opens its wandb run.
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "wandb.py").write_text(
        "import json, os\n"
        "def init(**kwargs):\n"
        "    with open(os.environ['WANDB_INITS'], 'a') as f:\n"
        "        f.write(json.dumps([kwargs['name'], kwargs['id'], kwargs['resume']]) + '\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "stub"), WANDB_INITS=str(tmp_path / "inits.jsonl"))
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

    def run(*flags, cwd=tmp_path):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "pqn.py"), *flags, "--track", "--no-cuda"], cwd=cwd, env=env
        )
        assert result.returncode == 0

    run(*FLAGS, "--total-timesteps", "512")
    run_dir = only_run_dir(tmp_path)
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    torch.save({**checkpoint, "finished": False}, os.path.join(run_dir, "checkpoint.pt"))  # as if stopped before the end
    run("--resume", os.path.relpath(run_dir, tmp_path) + "/")
    (tmp_path / "other").mkdir()
    run(*FLAGS, "--total-timesteps", "512", cwd=tmp_path / "other")
    first, resumed, other = [json.loads(line) for line in (tmp_path / "inits.jsonl").read_text().splitlines()]
    assert first == resumed and first[0] == os.path.basename(run_dir) and first[2] == "allow"
    assert other[1] != first[1]  # another run, another wandb run


@pytest.mark.parametrize("module", [pqn, atari, lstm, pdqn, qd], ids=lambda m: m.__name__)
def test_track_without_wandb_is_refused_before_training(module, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "wandb" else find_spec(name, *rest))
    extra = {"teacher_model_path": "teacher.pt"} if module is qd else {}
    with pytest.raises(module.UsageError, match=r"--track needs wandb: pip install -r requirements/wandb.txt"):
        module.finalize_args(module.Args(track=True, **extra))


def test_wandb_failing_to_start_the_run_is_one_line(tmp_path):
    (tmp_path / "stub").mkdir()
    (tmp_path / "stub" / "wandb.py").write_text(
        "def init(**kwargs):\n    raise RuntimeError('api_key not configured (no-tty)\\ncall wandb.login()')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "stub"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pqn.py"), *FLAGS, "--total-timesteps", "512", "--track"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert error_line(result) == "error: --track: wandb could not start the run: api_key not configured (no-tty)"


@pytest.mark.parametrize("script", list(ONE_ITERATION))
def test_the_gpu_running_out_of_memory_is_one_line(tmp_path, script):
    # No GPU needed: torch.as_tensor, which every script calls on its observations, fails as a full GPU would.
    driver = (
        "import runpy, sys, torch\n"
        "def out_of_memory(*args, **kwargs):\n"
        "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB.\\nmore detail')\n"
        "torch.as_tensor = out_of_memory\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, os.path.join(ROOT, script), *ONE_ITERATION[script].split(), "--no-cuda"],
        cwd=tmp_path,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert error_line(result) == "error: out of GPU memory: CUDA out of memory. Tried to allocate 20.00 GiB."


def test_resume_rejects_a_flag_that_contradicts_the_run(killed_and_resumed):
    script, run_dir, _, _ = killed_and_resumed
    line = error_line(run_script(script, "--resume", run_dir, "--learning-rate", "0.1", cwd=os.path.dirname(run_dir)))
    saved = SCRIPTS[script][0].Args().learning_rate  # the runs use each script's default
    assert f"--learning-rate 0.1 contradicts the resumed run's --learning-rate {saved}" in line


def test_loaded_training_state_continues_exactly_as_if_never_saved(tmp_path):
    # The network and RAdam after a save and a load take the same steps as the ones never saved.
    torch.manual_seed(0)
    space = gym.spaces.Box(-1.0, 1.0, (4,))
    q_network = pqn.QNetwork(space, 2, pqn.agent_generators([0, 1]))
    optimizer = pqn.RAdam(q_network.parameters(), lr=1e-2)
    minibatch = (torch.randn(2, 16, 4), torch.randint(2, (2, 16)), torch.randn(2, 16), torch.ones(2, 16))
    for _ in range(3):
        pqn.grad_step(q_network, optimizer, *minibatch, 1.0)
    pqn.save_atomically({"q_network": q_network.state_dict(), "optimizer": optimizer.state_dict()}, str(tmp_path / "state.pt"))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    restored = pqn.QNetwork(space, 2, pqn.agent_generators([5, 6]))
    restored_optimizer = pqn.RAdam(restored.parameters(), lr=0.5)
    restored.load_state_dict(state["q_network"])
    restored_optimizer.load_state_dict(state["optimizer"])
    for p, q in zip(restored.parameters(), q_network.parameters()):
        assert torch.equal(p, q)  # the saved numbers themselves, not a recomputation
    for _ in range(8):  # through RAdam's rectification at step 6
        pqn.grad_step(q_network, optimizer, *minibatch, 1.0)
        pqn.grad_step(restored, restored_optimizer, *minibatch, 1.0)
    for p, q in zip(restored.parameters(), q_network.parameters()):
        torch.testing.assert_close(p, q)


def test_random_states_survive_a_checkpoint(tmp_path):
    pqn.save_atomically({"rng": pqn.rng_state()}, str(tmp_path / "rng.pt"))
    draws = (random.random(), np.random.rand(), torch.rand(3))
    pqn.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    class BreaksMidway:
        def __reduce__(self):
            raise KeyboardInterrupt  # as if the process were stopped while the file is being written

    path = str(tmp_path / "checkpoint.pt")
    pqn.save_atomically({"global_step": 1, "weights": torch.ones(1000)}, path)
    with pytest.raises(KeyboardInterrupt):
        pqn.save_atomically({"global_step": 2, "weights": torch.zeros(1000), "last": BreaksMidway()}, path)
    assert os.path.getsize(path + ".tmp") > 0  # the broken write happened, beside the checkpoint
    assert torch.load(path, weights_only=True)["global_step"] == 1


@pytest.mark.parametrize(
    "script, signum",
    [
        ("pqn.py", signal.SIGINT),
        ("pqn.py", signal.SIGTERM),
        ("pqn_atari_envpool.py", signal.SIGINT),
        ("pdqn_minatar.py", signal.SIGTERM),
    ],
)
def test_an_interrupt_saves_a_checkpoint_and_the_model_and_exits_with_one_line(tmp_path, script, signum):
    flags = SCRIPTS[script][1]
    process = start_script(*flags, "--total-timesteps", "1000000", "--save-model", cwd=tmp_path, script=script)
    run_dir = None
    deadline = time.time() + 120
    while run_dir is None and time.time() < deadline:  # until the first iteration's scalars are written
        assert process.poll() is None, process.communicate()
        runs = os.path.join(tmp_path, "runs")
        if (
            os.path.isdir(runs)
            and os.listdir(runs)
            and any(f.startswith("events") for f in os.listdir(os.path.join(runs, os.listdir(runs)[0])))
        ):
            run_dir = os.path.join(runs, os.listdir(runs)[0])
        time.sleep(0.05)
    time.sleep(2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert (
        f"{signal.Signals(signum).name}: stopped at step" in stderr
        and f"--resume {os.path.relpath(run_dir, tmp_path)}" in stderr
    )
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert 0 < checkpoint["global_step"] < 1_000_000
    assert os.path.isfile(os.path.join(run_dir, script.replace(".py", ".pt")))


def test_a_diverging_run_stops_at_the_first_non_finite_loss(tmp_path):
    flags = [*FLAGS, "--total-timesteps", str(TOTAL), "--learning-rate", "1e30", "--max-grad-norm", "1e30"]
    line = error_line(run_script("pqn.py", *flags, cwd=tmp_path))
    assert "is not finite at step" in line
    steps = [s for s, _ in read_scalars(only_run_dir(tmp_path)).get("losses/td_loss", [])]
    stopped_at = int(line.split("at step ")[1].split(";")[0].replace(",", ""))
    assert stopped_at < TOTAL and all(s < stopped_at for s in steps)  # nothing non-finite was logged


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--learning-rate", "inf"], "--learning-rate must be a finite number, got inf"),
        (["--gamma", "nan"], "--gamma must be a finite number, got nan"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive, got -1.0"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be positive, got 0.0"),
        (["--checkpoint-frequency", "0"], "--checkpoint-frequency must be positive"),
        (["--num-envs", "100000000000", "--total-timesteps", "100000000000000"], "the rollout and the envs"),
        (["--resume", "nowhere"], "no checkpoint at nowhere/checkpoint.pt"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(run_script("pqn.py", *FLAGS, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "script, flags, message",
    [
        *[
            (script, ["--seed", "abc"], "Error parsing --seed: invalid literal for int() with base 10: 'abc'")
            for script in ["pqn.py", "pqn_atari_envpool.py", "pqn_atari_envpool_lstm.py", "qdagger_dqn_atari_impalacnn.py"]
        ],
        ("pqn.py", ["--no-such-flag"], "Unrecognized options: --no-such-flag"),
        # A message tyro wraps over two lines of its box is one line here.
        (
            "pdqn_minatar.py",
            ["--model-cell-head", "a-head-of-a-name-long-enough-to-be-wrapped"],
            "invalid choice 'a-head-of-a-name-long-enough-to-be-wrapped' for argument '--model-cell-head'. "
            "Expected one of ('linear', 'conv').",
        ),
    ],
)
def test_what_the_command_line_parser_refuses_is_one_line(tmp_path, script, flags, message):
    result = run_script(script, *flags, cwd=tmp_path)
    assert result.returncode == 2 and error_line(result) == f"error: {message}" and not result.stdout


def test_help_is_still_printed_whole(tmp_path):
    result = run_script("pqn.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr
    assert result.stdout.startswith("usage: ") and "--num-envs INT" in result.stdout


@pytest.mark.parametrize("name", ["a/b", ""])
@pytest.mark.parametrize("module", [pqn, atari, lstm, pdqn, qd], ids=lambda m: m.__name__)
def test_an_exp_name_that_is_not_a_file_name_is_refused_before_training(module, name):
    # It names the run folder and the saved model: "a/b" would fail to save the model after the run.
    with pytest.raises(module.UsageError, match=f"--exp-name .* must be a file name, got {name!r}"):
        module.finalize_args(module.Args(exp_name=name))


@pytest.mark.parametrize("flag", ["resume", "eval_checkpoint", "wandb_entity"])
@pytest.mark.parametrize("module", [pqn, atari, lstm, pdqn, qd], ids=lambda m: m.__name__)
def test_a_path_or_name_given_empty_is_refused_not_taken_as_left_out(module, flag):
    # `--resume "$RUN"` with RUN unset: without the check, a new run would train.
    given = {"teacher_model_path": "teacher.pt"} if module is qd else {}
    with pytest.raises(module.UsageError, match=f"--{flag.replace('_', '-')} is empty"):
        module.finalize_args(module.Args(**{flag: ""}, **given))


@pytest.mark.parametrize("script", ["pqn.py", "qdagger_dqn_atari_impalacnn.py"])
def test_an_empty_resume_on_the_command_line_is_one_line_and_trains_nothing(tmp_path, script):
    result = run_script(script, "--resume", "", "--no-cuda", cwd=tmp_path)
    assert error_line(result) == "error: --resume is empty: give it a value or leave it out" and result.returncode == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("module", [pqn, atari, lstm, pdqn, qd], ids=lambda m: m.__name__)
def test_more_envs_than_could_ever_fit_are_refused_before_any_is_made(module, monkeypatch):
    # Without the check, a billion evaluation envs (or their seeds) would fill the memory first.
    monkeypatch.setattr(module, "memory_available", lambda: 2**40)  # 1 TiB: more than most machines have
    given = {"teacher_model_path": "teacher.pt"} if module is qd else {}
    module.finalize_args(module.Args(eval_episodes=100, **given))
    with pytest.raises(module.UsageError, match=r"and the envs \(--num-envs.*would take [\d.]+ GiB"):
        module.finalize_args(module.Args(eval_episodes=10**9, **given))
    if module is qd:  # the teacher's evaluation envs, open before either buffer is made
        with pytest.raises(qd.UsageError, match=r"--teacher-eval-episodes\) would take"):
            qd.finalize_args(qd.Args(teacher_eval_episodes=10**9, **given))


def test_the_memory_check_takes_a_container_limit_below_the_machines_memory(tmp_path, monkeypatch):
    (tmp_path / "v2").write_text("1073741824\n")  # a 1 GiB cgroup v2 limit
    (tmp_path / "unlimited").write_text("max\n")
    monkeypatch.setattr(
        pqn, "CGROUP_MEMORY_LIMITS", [str(tmp_path / "missing"), str(tmp_path / "unlimited"), str(tmp_path / "v2")]
    )
    assert pqn.memory_available() == min(1 << 30, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with pytest.raises(pqn.UsageError, match="the rollout would take 2.0 GiB and this machine lets it use 1.0 GiB"):
        pqn.check_memory(2 << 30, "the rollout")
    pqn.check_memory(1 << 29, "the rollout")
    monkeypatch.setattr(pqn, "CGROUP_MEMORY_LIMITS", [str(tmp_path / "missing"), str(tmp_path / "unlimited")])
    assert pqn.memory_available() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_an_unwritable_output_folder_is_one_line_before_training(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    line = error_line(run_script("pqn.py", *FLAGS, "--total-timesteps", "1024", cwd=tmp_path))
    assert line.startswith("error: cannot write to runs/CartPole-v1__pqn__1__")


def test_runs_of_the_same_name_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = pqn.new_run_dirs(["CartPole-v1__pqn__1", "CartPole-v1__pqn__2"])
    second = pqn.new_run_dirs(["CartPole-v1__pqn__1", "CartPole-v1__pqn__2"])  # as a run beside it would
    assert len(set(first + second)) == 4 and all(os.path.isdir(run_dir) for run_dir in first + second)
    stamps = [int(run_dir.rsplit("__", 1)[1]) for run_dir in first + second]
    assert stamps[0] == stamps[1] and stamps[2] == stamps[3] and stamps[2] > stamps[0]
    # Where only the second name is taken, the first name's new folder is removed again.
    now = int(time.time())
    for stamp in (now, now + 1):
        os.makedirs(f"runs/b__{stamp}")
    a, b = pqn.new_run_dirs(["a", "b"])
    assert a == f"runs/a__{now + 2}" and b == f"runs/b__{now + 2}"
    assert not os.path.exists(f"runs/a__{now}") and not os.path.exists(f"runs/a__{now + 1}")
    # Where a later name cannot be made for another reason, one error line, and no folder is left behind.
    makedirs = os.makedirs

    def disk_full_at_b(path, *args, **kwargs):
        if path.startswith("runs/b__"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", disk_full_at_b)
    before = set(os.listdir("runs"))
    with pytest.raises(pqn.UsageError, match="cannot write to runs/b__"):
        pqn.new_run_dirs(["a", "b"])
    assert set(os.listdir("runs")) == before


class FolderChecked(Exception):
    """Stops main where it checks that it can write to its run folder."""


@pytest.mark.parametrize(
    "module, flags",
    [
        (pqn, "--num-seeds 2 --num-envs 4 --eval-episodes 1"),
        (atari, "--num-envs 4 --num-minibatches 2 --eval-episodes 1"),
        (lstm, "--num-envs 4 --num-minibatches 2 --eval-episodes 1"),
        (pdqn, "--env-id MinAtar/Breakout-v1 --num-envs 4 --eval-episodes 1"),
        (qd, "--teacher-model-path teacher.pt --num-envs 1 --eval-episodes 1 --buffer-size 1000"),
    ],
    ids=lambda p: p.__name__ if hasattr(p, "__name__") else p,
)
def test_a_run_never_writes_into_the_folder_a_run_beside_it_made(module, flags, tmp_path, monkeypatch):
    # Another run of the same name makes the very folder this run is about to make (both started in
    # the same second): this run must take a folder of its own.
    monkeypatch.chdir(tmp_path)
    torch.save(
        {
            "format": qd.TEACHER_FORMAT,
            "env_id": "Breakout-v5",
            "num_actions": 4,
            "observation_shape": [4, 84, 84],
            "q_network": qd.QNetwork(4, 4).state_dict(),
        },
        "teacher.pt",
    )
    made_beside, makedirs = [], os.makedirs

    def makedirs_after_the_run_beside(path, *args, **kwargs):
        if not made_beside and str(path).startswith("runs/"):
            makedirs(path)
            made_beside.append(str(path))
        return makedirs(path, *args, **kwargs)

    def stop(run_dir):
        raise FolderChecked(run_dir)

    monkeypatch.setattr(os, "makedirs", makedirs_after_the_run_beside)
    monkeypatch.setattr(module, "check_writable", stop)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C handler
    monkeypatch.setattr(torch, "set_flush_denormal", lambda _: True)  # nor does this process's arithmetic change
    args = module.finalize_args(tyro.cli(module.Args, args=[*flags.split(), "--no-cuda"]))
    with pytest.raises(FolderChecked) as checked:
        module.main(args, set())
    (beside,) = made_beside
    run_dir = checked.value.args[0]
    assert run_dir != beside and run_dir.rsplit("__", 1)[0] == beside.rsplit("__", 1)[0]
    assert os.path.isdir(run_dir) and os.listdir(beside) == []


@pytest.mark.parametrize(
    "module, flags",
    [
        (pqn, [*FLAGS, "--num-seeds", "2", "--total-timesteps", "2048", "--checkpoint-frequency", "512"]),
        (atari, [*ATARI_FLAGS, "--total-timesteps", "256", "--checkpoint-frequency", "64"]),
        (lstm, [*ATARI_FLAGS, "--total-timesteps", "256", "--checkpoint-frequency", "64"]),
        (pdqn, [*FLAGS, "--total-timesteps", "2048", "--checkpoint-frequency", "512", "--planning-delay-updates", "1"]),
    ],
    ids=["pqn", "atari", "lstm", "pdqn"],
)
def test_what_was_logged_up_to_a_checkpoint_is_on_disk_before_it_is_written(module, flags, tmp_path, monkeypatch):
    # A run killed right after a checkpoint resumes from it and purges what was logged after it: what
    # was logged before it must be in the event files by then, not in a writer's queue or buffer.
    monkeypatch.chdir(tmp_path)
    checkpoints = record_scalars_and_checkpoints(monkeypatch, module)
    assert module.main(module.finalize_args(tyro.cli(module.Args, args=flags)), set()) in (None, 0)
    assert len(checkpoints) == 4 and checkpoints[0][0] > 0
    # Flushed, rather than written by the writer's thread in time: on disk on a slower machine too.
    assert all(on_disk == given and unflushed == 0 for given, on_disk, unflushed in checkpoints), checkpoints


def test_broken_checkpoints_and_conflicting_env_ids_are_one_line(tmp_path):
    torch.save({"format": pqn.CHECKPOINT_FORMAT}, tmp_path / "only_format.pt")
    line = error_line(run_script("pqn.py", "--eval-checkpoint", "only_format.pt", "--no-cuda", cwd=tmp_path))
    assert "only_format.pt is not a pqn.py checkpoint" in line
    (tmp_path / "run").mkdir()
    torch.save({"format": pqn.CHECKPOINT_FORMAT}, tmp_path / "run" / "checkpoint.pt")
    line = error_line(run_script("pqn.py", "--resume", "run", "--no-cuda", cwd=tmp_path))
    assert "run/checkpoint.pt is not a pqn.py training checkpoint" in line
    q_network = pqn.QNetwork(gym.make("CartPole-v1").observation_space, 2, pqn.agent_generators([0]))
    torch.save({"q_network": q_network.state_dict(), "args": {"env_id": "CartPole-v1"}}, tmp_path / "cartpole.pt")
    line = error_line(
        run_script("pqn.py", "--eval-checkpoint", "cartpole.pt", "--env-id", "Acrobot-v1", "--no-cuda", cwd=tmp_path)
    )
    assert "cartpole.pt was trained on CartPole-v1, not Acrobot-v1" in line


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be positive, got -1.0"),
        (
            ["--num-envs", "1000000000", "--num-minibatches", "1", "--total-timesteps", "100000000000"],
            "the rollout and the envs (--num-envs and --eval-episodes) would take",
        ),
    ],
)
@pytest.mark.parametrize("script", ["pqn_atari_envpool.py", "pqn_atari_envpool_lstm.py"])
def test_atari_bad_input_gives_one_clear_line(tmp_path, script, flags, message):
    line = error_line(run_script(script, *ATARI_FLAGS, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_atari_broken_model_and_conflicting_env_id_are_one_line(tmp_path):
    torch.save({"format": atari.MODEL_FORMAT}, tmp_path / "only_format.pt")
    line = error_line(run_script("pqn_atari_envpool.py", "--eval-checkpoint", "only_format.pt", "--no-cuda", cwd=tmp_path))
    assert "only_format.pt is not a pqn_atari_envpool.py model" in line
    args = atari.finalize_args(atari.Args(num_envs=4, num_steps=16, num_minibatches=2, total_timesteps=64))
    atari.save_model(str(tmp_path / "breakout.pt"), atari.QNetwork(4, 4), args, 4)
    line = error_line(
        run_script(
            "pqn_atari_envpool.py", "--eval-checkpoint", "breakout.pt", "--env-id", "Pong-v5", "--no-cuda", cwd=tmp_path
        )
    )
    assert "breakout.pt was trained on Breakout-v5, not Pong-v5" in line


def test_pdqn_interrupt_reaching_its_env_workers_too_stops_cleanly(tmp_path):
    # Ctrl-C and Slurm signal every process of the job: the async env workers must leave the
    # answer to the main process, which stops with one line.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    flags = [*SCRIPTS["pdqn_minatar.py"][1], "--total-timesteps", "1000000"]
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "pdqn_minatar.py"), *flags],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list((tmp_path / "runs").glob("*/events*")) and time.time() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    time.sleep(3)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list((tmp_path / "runs").glob("*/checkpoint.pt"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sticky-action-prob", "inf"], "--sticky-action-prob must be a finite number, got inf"),
        (["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan"),
        (["--max-grad-norm", "0"], "--max-grad-norm must be positive"),
        (["--num-envs", "1000000000", "--total-timesteps", "100000000000"], "the rollout, the imagined rollout"),
        (["--planning-steps", "1000000000000"], "the rollout, the imagined rollout (--planning-steps) and the envs"),
    ],
)
def test_pdqn_bad_input_gives_one_clear_line(tmp_path, flags, message):
    line = error_line(run_script("pdqn_minatar.py", *FLAGS, *flags, cwd=tmp_path))
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "runs").exists()


def test_pdqn_saved_model_evaluates_and_a_broken_one_is_one_line(tmp_path):
    result = run_script("pdqn_minatar.py", *FLAGS, "--total-timesteps", "512", "--save-model", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = os.path.relpath(os.path.join(only_run_dir(tmp_path), "pdqn_minatar.pt"), tmp_path)
    result = run_script("pdqn_minatar.py", "--eval-checkpoint", path, "--eval-episodes", "2", "--no-cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "MinAtar/Breakout-v1: greedy return over 2 episodes" in result.stdout
    line = error_line(run_script("pdqn_minatar.py", "--eval-checkpoint", path, "--env-id", "MinAtar/Asterix-v1", cwd=tmp_path))
    assert "was trained on MinAtar/Breakout-v1, not MinAtar/Asterix-v1" in line
    torch.save({"format": pdqn.MODEL_FORMAT}, tmp_path / "only_format.pt")
    line = error_line(run_script("pdqn_minatar.py", "--eval-checkpoint", "only_format.pt", cwd=tmp_path))
    assert "only_format.pt is not a pdqn_minatar.py model" in line
