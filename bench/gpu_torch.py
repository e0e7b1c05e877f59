#!/usr/bin/env python3
"""PyTorch side of bench/gpu.sh: the same LRCN (tests/nn/lrcn_torch.py) on the
same GPU, with PyTorch's DEFAULT settings (TF32 and cudnn.benchmark as the
installed version sets them; the first line prints them), measured as
nn-bench measures ours: host tensors in, host results out.

    gpu_torch.py info
    gpu_torch.py fwd ARCH SLICES REPS       median ms of one series' inference
    gpu_torch.py train ARCH SLICES STEPS    one series per step, Adam, slices/s
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nn"))
from lrcn_torch import LRCN  # noqa: E402

DEV = torch.device("cuda")


def info():
    print(f"torch={torch.__version__} cuda={torch.version.cuda} "
          f"cudnn={torch.backends.cudnn.version()} gpu=\"{torch.cuda.get_device_name()}\" "
          f"matmul_tf32={torch.backends.cuda.matmul.allow_tf32} "
          f"cudnn_tf32={torch.backends.cudnn.allow_tf32} "
          f"cudnn_benchmark={torch.backends.cudnn.benchmark}")


def fwd(arch, slices, reps):
    m = LRCN(arch).to(DEV).eval()
    x = torch.rand(slices, 3, 128, 128)
    ms = []
    with torch.no_grad():
        for i in range(reps + 3):  # 3 warm-ups
            t0 = time.perf_counter()
            torch.sigmoid(m(x.to(DEV), [slices])).cpu()
            if i >= 3:
                ms.append(1e3 * (time.perf_counter() - t0))
    print(f"lrcn_fwd arch={arch} slices={slices} device=torch median_ms={statistics.median(ms):.2f} "
          f"min_ms={min(ms):.2f} reps={reps}")


def train(arch, slices, steps):
    m = LRCN(arch).to(DEV).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.rand(slices, 3, 128, 128)
    y = torch.zeros(slices, 6)
    y[::7, 0] = 1.0
    best, loss = 1e30, 0.0
    for s in range(steps + 1):  # step 0 is the warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        logits = m(x.to(DEV), [slices])
        loss = Fn.binary_cross_entropy_with_logits(logits, y.to(DEV))
        loss.backward()
        opt.step()
        loss = loss.item()  # as ours, the loss comes back to the host each step
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        if s > 0:
            best = min(best, t)
    print(f"train arch={arch} slices={slices} device=torch s_per_step={best:.4f} "
          f"slices_per_s={slices / best:.1f} loss={loss:.4f}")


def main():
    torch.manual_seed(0)
    mode = sys.argv[1]
    if mode == "info":
        info()
    elif mode == "fwd":
        fwd(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


if __name__ == "__main__":
    main()
