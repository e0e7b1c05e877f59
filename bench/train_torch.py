#!/usr/bin/python3
"""bench/train_torch.py: the PyTorch side of bench/train.sh. The same
architecture (tests/nn/lrcn_torch.py, the normative module), the same batches
and steps as train-bench: stage 1 = CNN forward + weighted BCE + backward +
Adam on BATCH augmented-size slices; stage 2 = BiLSTM + dense on precomputed
features of SERIES series of LEN slices, CNN frozen. Prints
stage1_slices_per_s=.. stage2_slices_per_s=.."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nn"))
from lrcn_torch import LRCN  # noqa: E402


def main():
    arch, B, S, L, secs, threads = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5]), int(sys.argv[6])
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    m = LRCN(arch)
    w = torch.tensor([2.0, 1, 1, 1, 1, 1])
    x = torch.rand(B, 3, 128, 128)
    y = torch.zeros(max(B, S * L), 6)
    y.view(-1)[::7] = 1
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss(weight=w)
    m.train()
    steps, t0 = 0, time.perf_counter()
    while True:
        opt.zero_grad()
        loss = loss_fn(m.cnn(x), y[:B])
        loss.backward()
        opt.step()
        steps += 1
        t = time.perf_counter() - t0
        if t >= secs and steps >= 2:
            break
    s1 = steps * B / t
    with torch.no_grad():
        m.eval()
        feat = torch.cat([m.cnn.features(torch.rand(min(B, S * L - a), 3, 128, 128))
                          for a in range(0, S * L, B)])
    for p in m.cnn.parameters():
        p.requires_grad_(False)
    m.train()
    m.cnn.eval()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    lengths = [L] * S
    steps, t0 = 0, time.perf_counter()
    while True:
        opt.zero_grad()
        logits = m.out(m.dense(m.sequence(feat, lengths)))
        loss = loss_fn(logits, y[:S * L])
        loss.backward()
        opt.step()
        steps += 1
        t = time.perf_counter() - t0
        if t >= secs and steps >= 2:
            break
    s2 = steps * S * L / t
    print(f"arch={arch} batch={B} series={S} len={L} stage1_slices_per_s={s1:.2f} "
          f"stage2_slices_per_s={s2:.1f} torch={torch.__version__}")


if __name__ == "__main__":
    main()
