"""The suite computes on one thread, as the runs it starts do (OMP_NUM_THREADS=1). The tests that run a
script in this process share the cores with envpool's threads and with the processes they start; two
OpenMP threads that spin-wait against those can make such a test many times slower."""

import torch

torch.set_num_threads(1)
