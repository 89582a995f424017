"""One gradient step of pqn_atari_envpool.py's Q-network (Nature CNN with LayerNorm) on a minibatch of
128 random frame stacks, timed on this machine: plain (eager) PyTorch with the script's RAdam and
with torch.optim.RAdam, the RAdam step alone, and compiled as `--compile` makes it (one graph:
forward, backward, clipping and RAdam) and split at backward() (forward and loss compiled, backward()
run by autograd, clipping and RAdam compiled). Each is timed `--repeat` times after a warm-up; the best
and the median are printed.

    python benchmark/atari_step_costs.py               # torch's default threads (all cores)
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pqn_atari_envpool as pqn  # noqa: E402


def times_ms(fn, repeat):
    fn()  # warm-up (and compilation)
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return f"best {min(out):6.1f} ms, median {statistics.median(out):6.1f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--minibatch-size", type=int, default=128)
    cli = parser.parse_args()
    torch.set_flush_denormal(True)  # as the scripts' main() does
    torch.manual_seed(0)
    n = cli.minibatch_size
    minibatch = (
        torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8),
        torch.randint(0, 4, (n,)),
        torch.randn(n),
        torch.ones(n),
    )
    q_network = pqn.QNetwork(4, 4)
    optimizer = pqn.RAdam(q_network.parameters(), lr=2.5e-4)
    torch_optimizer = torch.optim.RAdam(q_network.parameters(), lr=2.5e-4)

    def train_step(*mb):
        return pqn.grad_step(q_network, optimizer, *mb, 10.0)

    print(f"one gradient step, minibatch of {n} frame stacks, {torch.get_num_threads()} threads, {cli.repeat} repeats:")
    print(f"  eager, the script's RAdam      {times_ms(lambda: train_step(*minibatch), cli.repeat)}")
    print(
        "  eager, torch.optim.RAdam       "
        f"{times_ms(lambda: pqn.grad_step(q_network, torch_optimizer, *minibatch, 10.0), cli.repeat)}"
    )
    print(f"  the script's RAdam step alone  {times_ms(optimizer.step, cli.repeat)}")
    print(f"  torch.optim.RAdam step alone   {times_ms(torch_optimizer.step, cli.repeat)}")
    one_graph = pqn.accelerate(train_step, compile=True, cudagraphs=False)
    print(f"  compiled, one graph (--compile) {times_ms(lambda: one_graph(*minibatch), cli.repeat)}")

    # The same step as three pieces: forward and loss compiled (AOTAutograd compiles their backward
    # too), backward() called eagerly, then clipping and RAdam compiled.
    @torch.compile
    def loss_of(obs, actions, returns, mask):
        return pqn.td_loss(q_network(obs).gather(1, actions[:, None]).squeeze(1), returns, mask)

    @torch.compile
    def clip_and_radam():
        torch.nn.utils.clip_grad_norm_(q_network.parameters(), 10.0, foreach=True)
        optimizer.step()

    def split(*mb):
        loss = loss_of(*mb)
        optimizer.zero_grad()
        loss.backward()
        clip_and_radam()

    print(f"  compiled, split at backward()   {times_ms(lambda: split(*minibatch), cli.repeat)}")
