#!/usr/bin/python3
"""train/vgg19_to_ichtriage.py: torchvision VGG19 weights -> an ichtriage
model file (`--arch vgg19`) to start `ichtriage train --init FILE` from.

    vgg19_to_ichtriage.py VGG19_STATE_DICT.pth OUT.safetensors [--input 128]

VGG19_STATE_DICT.pth is what `torch.save(torchvision.models.vgg19(weights=
"IMAGENET1K_V1").state_dict(), path)` writes. torchvision's `features`
Sequential and ours (docs/model-format.md, preset vgg19) have the same layers at
the same indices (conv, ReLU, ..., MaxPool), so `features.{i}.weight/bias`
become `cnn.features.{i}.weight/bias` unchanged. torchvision's classifier
(25088 -> 4096 -> 4096 -> 1000, for 224x224) does not fit the paper's head
(8192 -> 1000 -> 1000 -> 6 at 128x128): the head, the BiLSTM and the dense
layers keep their fresh initialisation. ImageNet weights expect their own
input normalisation; the node's preprocessing is the windows mapped to [0, 1],
and the file says so in `preprocessing` and `init` (nothing else is applied).

Needs only torch (Debian's python3-torch) and tests/nn/lrcn_torch.py."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nn"))
from lrcn_torch import LRCN, save_model  # noqa: E402


def convert(state_dict, input_hw=128, seed=1):
    torch.manual_seed(seed)
    model = LRCN("vgg19", 3, (input_hw, input_hw))
    ours = model.state_dict()
    copied = 0
    for name, t in state_dict.items():
        if not name.startswith("features."):
            continue
        dst = "cnn." + name
        if dst not in ours:
            raise SystemExit(f"vgg19_to_ichtriage: {name} has no place in the vgg19 preset")
        if tuple(ours[dst].shape) != tuple(t.shape):
            raise SystemExit(f"vgg19_to_ichtriage: {name} is {tuple(t.shape)}, "
                             f"expected {tuple(ours[dst].shape)}")
        ours[dst] = t.detach().to(torch.float32).clone()
        copied += 1
    if copied != 32:
        raise SystemExit(f"vgg19_to_ichtriage: {copied} convolution tensors found, VGG19 has 32")
    model.load_state_dict(ours)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("state_dict")
    ap.add_argument("out")
    ap.add_argument("--input", type=int, default=128)
    a = ap.parse_args()
    sd = torch.load(a.state_dict, map_location="cpu")
    if hasattr(sd, "state_dict"):
        sd = sd.state_dict()
    model = convert(sd, a.input)
    save_model(model, a.out, init="torchvision vgg19 features (converted by "
               "train/vgg19_to_ichtriage.py); head, LSTM and dense freshly initialised",
               provenance="vgg19_to_ichtriage.py from " + os.path.basename(a.state_dict),
               preprocessing="hu=stored*slope+intercept;window=clamp01;resize=area;"
               "no ImageNet normalisation")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
