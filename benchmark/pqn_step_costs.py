"""Where pqn.py's time goes on this machine: one iteration split into rollout, Q(lambda) targets and
update, and one gradient step split into its parts; plain (eager) PyTorch, one thread, and the
gradient step as `--compile` makes it (one fused graph), with a torch.profiler table of where that
step's time goes (Inductor's kernels profiled one by one); then acting on cleanrl's 4 envs.

    python benchmark/pqn_step_costs.py            # pqn.py's defaults (32 envs x 64 steps, 16 minibatches, 8 epochs)
    python benchmark/pqn_step_costs.py 32         # the same for 32 agents at once (--num-seeds 32)
"""

import os
import sys
import time

import numpy as np
import torch
import torch._inductor.config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pqn  # noqa: E402


def ms(fn, repeat):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the scripts' main() does
    args = pqn.finalize_args(pqn.Args(num_seeds=int(sys.argv[1]) if len(sys.argv) > 1 else 1))
    seeds = list(range(1, args.num_seeds + 1))
    envs = pqn.make_envs(args.env_id, pqn.agents_env_seeds(seeds, "training", args.num_envs))
    generators = pqn.agent_generators(seeds)
    q_network = pqn.QNetwork(envs.single_observation_space, envs.single_action_space.n, generators)
    optimizer = pqn.RAdam(q_network.parameters(), lr=args.learning_rate)
    obs = torch.as_tensor(envs.reset()[0])
    is_reset, stats, epsilon = np.zeros(envs.num_envs, dtype=bool), pqn.EpisodeStats(envs.num_envs), torch.tensor(0.5)

    def policy(obs, epsilon, act=lambda *inputs: pqn.act(q_network, *inputs)):  # as main() acts
        return act(obs, epsilon, pqn.draw_noise(generators, obs.shape[0] // args.num_seeds, obs.device))

    train_step = lambda *mb: pqn.grad_step(q_network, optimizer, *mb, args.max_grad_norm)  # noqa: E731
    b, *_ = pqn.rollout(envs, policy, obs, is_reset, epsilon, args.num_steps, stats)
    returns = pqn.q_lambda_returns(b["rewards"], b["terminations"], b["truncations"], b["next_q"], args.gamma, args.q_lambda)
    print(f"per iteration ({args.batch_size} env steps of each of {args.num_seeds} agent(s)):")
    print(f"  rollout      {ms(lambda: pqn.rollout(envs, policy, obs, is_reset, epsilon, args.num_steps, stats), 10):7.2f} ms")
    print(
        f"    env step   {ms(lambda: envs.step(np.zeros(envs.num_envs, dtype=np.int64)), 200) * args.num_steps:7.2f} "
        f"ms ({args.num_steps} vector steps)"
    )
    rollout_parts = (b["rewards"], b["terminations"], b["truncations"], b["next_q"])
    print(f"  targets      {ms(lambda: pqn.q_lambda_returns(*rollout_parts, args.gamma, args.q_lambda), 20):7.2f} ms")

    def update():
        pqn.update(train_step, b, returns, generators, args.update_epochs, args.minibatch_size)

    print(f"  update       {ms(update, 3):7.2f} ms")

    def by_agent(x):  # as update() lays out a rollout: [S, T * N, ...]
        return x.unflatten(1, (args.num_seeds, -1)).transpose(0, 1).flatten(1, 2)[:, : args.minibatch_size]

    mb = (by_agent(b["obs"]), by_agent(b["actions"]), by_agent(returns), torch.ones(args.num_seeds, args.minibatch_size))
    print(f"per gradient step (minibatch of {args.minibatch_size} for each agent):")
    print(f"  whole step   {ms(lambda: train_step(*mb), 300):7.2f} ms")

    def forward_backward():
        q_taken = q_network(mb[0].flatten(0, 1)).gather(1, mb[1].reshape(-1, 1)).view(mb[1].shape)
        optimizer.zero_grad()
        pqn.td_loss(q_taken, mb[2], mb[3]).sum().backward()

    print(f"  fwd + bwd    {ms(forward_backward, 300):7.2f} ms")
    print(
        f"  clip         {ms(lambda: pqn.clip_grad_norm_per_agent(q_network.parameters(), args.max_grad_norm), 300):7.2f} ms"
    )
    print(f"  RAdam step   {ms(optimizer.step, 300):7.2f} ms")
    torch._inductor.config.cpp.enable_kernel_profile = True  # each Inductor kernel its own profiler row
    compiled_step = pqn.accelerate(train_step, compile=True, cudagraphs=False)
    compiled_step(*mb)  # compiles
    print(f"  whole step, compiled (--compile) {ms(lambda: compiled_step(*mb), 300):7.2f} ms")
    with torch.profiler.profile() as profile:
        for _ in range(200):
            compiled_step(*mb)
    print("the compiled step under torch.profiler, 200 calls (self time; kernels are rows of their own):")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    small_envs = pqn.make_envs(args.env_id, pqn.agents_env_seeds(seeds, "training", 4))
    small_obs, small_epsilon = torch.as_tensor(small_envs.reset()[0]), torch.tensor(0.5)
    compiled_act = pqn.accelerate(lambda *inputs: pqn.act(q_network, *inputs), compile=True, cudagraphs=False)
    policy(small_obs, small_epsilon, compiled_act)  # compiles
    print("per vector step with 4 envs of each agent (cleanrl's default):")
    print(f"  act          {ms(lambda: policy(small_obs, small_epsilon), 1000):7.3f} ms")
    print(f"  act, compiled {ms(lambda: policy(small_obs, small_epsilon, compiled_act), 1000):6.3f} ms")
    print(f"  env step     {ms(lambda: small_envs.step(np.zeros(small_envs.num_envs, dtype=np.int64)), 1000):7.3f} ms")
