#!/usr/bin/env python3
"""The reference side of the matmul bench's prefill section (kernels/benches/matmul.rs):
PyTorch's bf16 `linear` (oneDNN, on AMX where the CPU has it) on the same shapes, rows and
thread count, the fastest of a few runs. Prints one GFLOP/s figure per shape, in order.

Usage: torch_linear.py THREADS ROWS K:N [K:N ...]
"""

import sys
import time

import torch

threads, rows = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
for shape in sys.argv[3:]:
    k, n = (int(v) for v in shape.split(":"))
    x = torch.randn(rows, k).bfloat16()
    w = torch.randn(n, k).bfloat16()
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - start) / 3)
    print(f"{2 * rows * k * n / best / 1e9:.1f}", flush=True)
