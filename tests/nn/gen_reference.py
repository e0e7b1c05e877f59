#!/usr/bin/python3
"""Writes the PyTorch reference files under tests/nn/ref/ that the C tests
compare against: small instances of every layer (inputs, weights, outputs,
every gradient), a tiny LRCN, one with a global max pool (GM) and a tiny
stage-1 CNN (train-mode logits, loss, all gradients, losses over a few Adam
steps) and the `small` preset as a PyTorch-made model file with its eval-mode
predictions.

    /usr/bin/python3 tests/nn/gen_reference.py    # needs Debian's python3-torch

Fixed seeds; the files are committed so that CI needs no torch.
"""
import os
import sys

import torch
from torch import nn
import torch.nn.functional as Fn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lrcn_torch import LRCN, save_model, save_safetensors  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref")
LABEL_W = torch.tensor([2.0, 1, 1, 1, 1, 1])
POS_W = torch.tensor([3.0, 2, 2, 2, 2, 2])


def leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def run(refs, prefix, fn, inputs, params):
    """out = fn(); loss = sum(out * dout); store inputs, params, out, dout and grads."""
    out = fn()
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    for k, v in {**inputs, **params}.items():
        refs[f"{prefix}.{k}"] = v.detach()
        if v.grad is not None:
            refs[f"{prefix}.d{k}"] = v.grad
    refs[f"{prefix}.out"] = out.detach()
    refs[f"{prefix}.dout"] = dout


def layers():
    refs = {}
    convs = {"conv_3x3": (3, 1, 1), "conv_s2": (3, 2, 1), "conv_1x1": (1, 1, 0), "conv_k5": (5, 2, 0)}
    for name, (k, s, p) in convs.items():
        x, w, b = leaf(2, 3, 9, 8), leaf(4, 3, k, k), leaf(4)
        run(refs, name, lambda: Fn.conv2d(x, w, b, s, p), {"x": x}, {"w": w, "b": b})
    # distinct values so that the argmax is unique
    x = (torch.randperm(2 * 3 * 6 * 7).float().reshape(2, 3, 6, 7) / 10).requires_grad_()
    run(refs, "maxpool", lambda: Fn.max_pool2d(x, 2, 2), {"x": x}, {})
    x = leaf(3, 17)
    run(refs, "relu", lambda: Fn.relu(x), {"x": x}, {})
    for name, shape in {"bn2d": (4, 3, 5, 5), "bn1d": (7, 5)}.items():
        c = shape[1]
        for mode in ("train", "eval"):
            x, g, b = leaf(*shape), leaf(c), leaf(c)
            rm, rv = torch.randn(c), torch.rand(c) + 0.5
            refs[f"{name}_{mode}.rm0"], refs[f"{name}_{mode}.rv0"] = rm.clone(), rv.clone()
            run(refs, f"{name}_{mode}",
                lambda: Fn.batch_norm(x, rm, rv, g, b, mode == "train", 0.1, 1e-5),
                {"x": x}, {"g": g, "b": b})
            refs[f"{name}_{mode}.rm1"], refs[f"{name}_{mode}.rv1"] = rm, rv
    x, w, b = leaf(5, 8), leaf(3, 8), leaf(3)
    run(refs, "linear", lambda: Fn.linear(x, w, b), {"x": x}, {"w": w, "b": b})
    x = leaf(2, 3, 4, 4)
    run(refs, "gap", lambda: Fn.adaptive_avg_pool2d(x, 1).flatten(1), {"x": x}, {})
    x = leaf(4, 6)
    run(refs, "sigmoid", lambda: torch.sigmoid(x), {"x": x}, {})
    x = leaf(5, 6)
    y = (torch.rand(5, 6) < 0.4).float()
    loss = Fn.binary_cross_entropy_with_logits(x, y, weight=LABEL_W, pos_weight=POS_W)
    loss.backward()
    refs.update({"bce.x": x.detach(), "bce.y": y, "bce.w": LABEL_W, "bce.pw": POS_W,
                 "bce.loss": loss.detach().reshape(1), "bce.dx": x.grad})
    # BiLSTM over three series of different lengths, packed back to back
    lengths = [3, 1, 5]
    lstm = nn.LSTM(5, 4, batch_first=True, bidirectional=True)
    x = leaf(sum(lengths), 5)
    seqs = list(torch.split(x, lengths))
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
    out, _ = lstm(packed)
    pad, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    out = torch.cat([pad[i, :n] for i, n in enumerate(lengths)])
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    refs.update({"lstm.x": x.detach(), "lstm.dx": x.grad, "lstm.out": out.detach(),
                 "lstm.dout": dout, "lstm.lengths": torch.tensor(lengths, dtype=torch.int32)})
    for k, v in lstm.named_parameters():
        refs[f"lstm.{k}"], refs[f"lstm.d{k}"] = v.detach(), v.grad
    save_safetensors(os.path.join(OUT, "layers.safetensors"), refs)


def train_reference(name, model, x, lengths, stage1, opt):
    """Train-mode logits, loss and gradients, then losses over 3 optimiser steps."""
    save_model(model, os.path.join(OUT, f"{name}.safetensors"), provenance="gen_reference.py")
    y = (torch.rand(x.shape[0], 6) < 0.3).float()
    model.train()
    refs = {"x": x, "y": y, "lengths": torch.tensor(lengths, dtype=torch.int32)}
    losses = []
    for step in range(4):
        opt.zero_grad()
        logits = model.cnn(x) if stage1 else model(x, lengths)
        loss = Fn.binary_cross_entropy_with_logits(logits, y, weight=LABEL_W, pos_weight=POS_W)
        loss.backward()
        if step == 0:
            refs["logits"] = logits.detach()
            for k, v in model.named_parameters():
                if v.grad is not None:
                    refs[f"grad.{k}"] = v.grad.clone()
        losses.append(loss.item())
        opt.step()
    refs["losses"] = torch.tensor(losses)
    save_safetensors(os.path.join(OUT, f"{name}_ref.safetensors"), refs)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    layers()

    torch.manual_seed(1)
    m = LRCN("b4,M,b6,M,c8,G|", 3, (16, 16), hidden=5, dense=6, dropout=0.0)
    lengths = [3, 1, 4]
    x = torch.rand(sum(lengths), 3, 16, 16)
    train_reference("tiny_lrcn", m, x, lengths, False, torch.optim.Adam(m.parameters(), lr=1e-2))

    torch.manual_seed(2)
    m = LRCN("c4,M,c6s2,F|d10,D0,d7", 3, (12, 12), hidden=4, dense=5, dropout=0.0)
    x = torch.rand(6, 3, 12, 12)
    opt = torch.optim.AdamW(m.cnn.parameters(), lr=1e-2, weight_decay=0.1)
    train_reference("tiny_cnn", m, x, [6], True, opt)

    # a global max pool (GM) as the feature: the gradient reaches the
    # convolutions through one argmax per channel
    torch.manual_seed(4)
    m = LRCN("b4,M,b6,M,c8,GM|", 3, (16, 16), hidden=5, dense=6, dropout=0.0)
    lengths = [2, 3]
    x = torch.rand(sum(lengths), 3, 16, 16)
    train_reference("tiny_gmp", m, x, lengths, False, torch.optim.Adam(m.parameters(), lr=1e-2))

    # the real `small` preset (at 32x32 to keep the file small) as a PyTorch
    # user would ship it: running statistics moved by a few training batches
    torch.manual_seed(3)
    m = LRCN("small", 3, (32, 32), hidden=16, dense=16, dropout=0.5)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(6, 3, 32, 32), [4, 2])
    m.eval()
    lengths = [3, 2]
    x = torch.rand(sum(lengths), 3, 32, 32)
    with torch.no_grad():
        prob = torch.sigmoid(m(x, lengths))
    save_model(m, os.path.join(OUT, "small_torch.safetensors"), provenance="gen_reference.py")
    save_safetensors(os.path.join(OUT, "small_torch_ref.safetensors"),
                     {"x": x, "lengths": torch.tensor(lengths, dtype=torch.int32), "prob": prob})


if __name__ == "__main__":
    main()
