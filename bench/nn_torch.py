#!/usr/bin/python3
"""PyTorch side of bench/nn.sh: the same models (tests/nn/lrcn_torch.py), the
same measurements as nn-bench, printed in the same key=value form.

    nn_torch.py THREADS fwd ARCH BATCH SECONDS
    nn_torch.py THREADS train ARCH SLICES STEPS
"""
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nn"))
from lrcn_torch import LRCN  # noqa: E402


def fwd(arch, batch, seconds):
    m = LRCN(arch).eval()
    x = torch.rand(batch, 3, 128, 128)
    with torch.no_grad():
        m.cnn(x)  # warm-up
        iters, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            m.cnn(x)
            iters += 1
            t = time.perf_counter() - t0
            if t >= seconds:
                break
    cpu = 1e3 * (time.process_time() - c0) / (batch * iters)
    print(f"fwd arch={arch} batch={batch} slices_per_s={batch * iters / t:.2f} "
          f"cpu_ms_per_slice={cpu:.1f}")


def train(arch, slices, steps):
    m = LRCN(arch).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.rand(slices, 3, 128, 128)
    y = torch.zeros(slices, 6)
    y[::7, 0] = 1.0
    best, cbest, loss = 1e30, 1e30, 0.0
    for s in range(steps + 1):  # step 0 is the warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss = Fn.binary_cross_entropy_with_logits(m(x, [slices]), y)
        loss.backward()
        opt.step()
        t, c = time.perf_counter() - t0, time.process_time() - c0
        if s > 0:
            best, cbest = min(best, t), min(cbest, c)
    print(f"train arch={arch} slices={slices} s_per_step={best:.3f} loss={loss.item():.4f} "
          f"cpu_s_per_step={cbest:.3f}")


def main():
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(0)
    mode, arch, a, b = sys.argv[2:6]
    if mode == "fwd":
        fwd(arch, int(a), float(b))
    else:
        train(arch, int(a), int(b))


if __name__ == "__main__":
    main()
