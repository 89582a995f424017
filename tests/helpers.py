"""Running a script as a user would, reading back what it logged, and what a compiled step mutates."""

import glob
import importlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch.compile on the CPU (Inductor) builds C++ kernels: it needs a C++ compiler and Python's headers.
NEEDS_INDUCTOR = pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++"))
    or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    reason="torch.compile on the CPU needs a C++ compiler and Python's headers",
)


def import_benchmark_tool(name):
    """A module of benchmark/ (which import each other by their bare names), imported in process."""
    sys.path.insert(0, os.path.join(ROOT, "benchmark"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def run_script(script, *flags, cwd, timeout=300):
    """Runs `python <script> <flags>` in `cwd` (where it writes runs/), without a GPU."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Runs a script as `python script` would, after arranging that the script sends itself SIGINT when one of
# its functions, chosen by name, is called for the n-th time: a signal at a chosen point of a run rather
# than at a moment, which would be early or late on another machine.
SIGNAL_DRIVER = """
import os, runpy, signal, sys
script, function, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = 0

def profile(frame, event, arg):
    global calls
    if event == "call" and frame.f_code.co_name == function and frame.f_code.co_filename == script:
        calls += 1
        if calls == n:
            sys.setprofile(None)
            os.kill(os.getpid(), signal.SIGINT)

# Ctrl-C as in a terminal, also where this process was started with SIGINT ignored (a shell's background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = [script, *sys.argv[4:]]
sys.setprofile(profile)
runpy.run_path(script, run_name="__main__")
"""


def run_script_interrupted_at(script, function, n, *flags, cwd, timeout=300):
    """run_script, with SIGINT sent when the script's function `function` is called the n-th time."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_DRIVER, os.path.join(ROOT, script), function, str(n), *flags],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from the TensorBoard event files in run_dir."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalars_on_disk(directory):
    """How many scalar values the event files under `directory` hold, as written (nothing purged)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    paths = glob.glob(os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True)
    events = (event for path in paths for event in EventFileLoader(path).Load())
    return sum(value.metadata.plugin_data.plugin_name == "scalars" for event in events for value in event.summary.value)


def record_scalars_and_checkpoints(monkeypatch, module):
    """Makes `module`'s writers count the scalars they are given, and its checkpoint writes record
    (scalars given so far, scalars in the event files on disk, writers not flushed since their last
    scalar), the run folders being under runs/ of the current directory. Returns that list, one entry
    per checkpoint."""
    given, writers, checkpoints, save_atomically = [0], [], [], module.save_atomically

    class CountingWriter(module.SummaryWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.unflushed = False
            writers.append(self)

        def add_scalar(self, *args, **kwargs):
            given[0] += 1
            self.unflushed = True
            return super().add_scalar(*args, **kwargs)

        def flush(self):
            self.unflushed = False
            return super().flush()

        def close(self):  # closing flushes too
            self.unflushed = False
            return super().close()

    def recorded_save(obj, path):
        if os.path.basename(path) == "checkpoint.pt":
            checkpoints.append((given[0], scalars_on_disk("runs"), sum(w.unflushed for w in writers)))
        return save_atomically(obj, path)

    monkeypatch.setattr(module, "SummaryWriter", CountingWriter)
    monkeypatch.setattr(module, "save_atomically", recorded_save)
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # pytest keeps its own Ctrl-C handler
    monkeypatch.setattr(torch, "set_flush_denormal", lambda _: True)  # nor does this process's arithmetic change
    return checkpoints


def read_text(run_dir, tag):
    acc = EventAccumulator(run_dir, size_guidance={"tensors": 0})
    acc.Reload()
    return acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()


def only_run_dir(cwd):
    dirs = glob.glob(os.path.join(cwd, "runs", "*"))
    assert len(dirs) == 1, dirs
    return dirs[0]


def error_line(result):
    """The single non-empty line a script prints on stderr for bad input."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def assert_greedy(actions, q):
    """Each action's Q-value is its row's maximum, up to rounding: Q-values computed another way
    (compiled, or with another batch size) may round differently, so comparing the argmax exactly
    could fail on another machine where two actions are almost tied."""
    torch.testing.assert_close(q.gather(1, actions[:, None]).squeeze(1), q.max(dim=1).values)


def mutated_inputs_cuda_graphs_would_skip(fn, *inputs):
    """Traces `fn` as a script's --compile does (AOTAutograd keeping input mutations in the graph)
    and returns the indices of the inputs it mutates that are neither parameters nor marked static:
    with any such input, --compile --cudagraphs (mode="reduce-overhead") runs the graph without a
    CUDA graph. Runs on the CPU: the check looks only at the traced graph."""
    from torch._dynamo.backends.common import aot_autograd

    skipped = []

    def inspect(graph, example_inputs):
        metadata = torch._guards.TracingContext.get().fw_metadata
        static = set(metadata.static_input_indices)
        skipped.extend(i for i, info in enumerate(metadata.input_info) if info.mutates_data and i not in static)
        return graph

    backend = aot_autograd(fw_compiler=inspect, inference_compiler=inspect, keep_inference_input_mutations=True)
    torch._dynamo.reset()
    torch._dynamo.config.trace_autograd_ops = True  # as the scripts' accelerate() sets it for --compile
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)  # one graph: nothing runs uninspected
    return skipped
