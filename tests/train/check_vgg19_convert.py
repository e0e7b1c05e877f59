#!/usr/bin/python3
"""tests/train/check_vgg19_convert.py: train/vgg19_to_ichtriage.py on a
randomly initialised VGG19 with torchvision's layout and names (torchvision
itself is not packaged for Debian's torch, so the same module is built here
with plain torch: torchvision.models.vgg19's `features` and `classifier`), then
checks that the file holds the same convolution weights and that ichtriage's
own loader accepts it (`ichtriage model register`).

Usage: check_vgg19_convert.py ICHTRIAGE"""
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "nn"))
from lrcn_torch import load_model  # noqa: E402

CFG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"]


class TorchvisionVGG19(nn.Module):
    """torchvision.models.vgg19(weights=None), layer for layer (the
    classifier shrunk: its weights are not converted, only its names matter)."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in CFG_E:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Linear(8, 4), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4, 4), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4, 10))


def main():
    tmp = tempfile.mkdtemp(prefix="ichtriage-vgg-")
    torch.manual_seed(3)
    tv = TorchvisionVGG19()
    src = os.path.join(tmp, "vgg19.pth")
    torch.save(tv.state_dict(), src)
    out = os.path.join(tmp, "vgg19.safetensors")
    r = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "train",
                        "vgg19_to_ichtriage.py"), src, out, "--input", "32"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, meta = load_model(out)
    assert meta["arch"] == "vgg19" and "vgg19" in meta["init"], meta
    sd = model.state_dict()
    n = 0
    for k, v in tv.state_dict().items():
        if k.startswith("features."):
            assert torch.equal(sd["cnn." + k], v), k
            n += 1
    assert n == 32, n
    r = subprocess.run([sys.argv[1], "model", "register", out, "--set",
                        "store.dir=" + os.path.join(tmp, "store")], capture_output=True, text=True)
    assert r.returncode == 0, "ichtriage refused the converted file: " + r.stderr
    # A state dict that is not VGG19 is refused with a message.
    bad = os.path.join(tmp, "bad.pth")
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, bad)
    r = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "train",
                        "vgg19_to_ichtriage.py"), bad, out], capture_output=True, text=True)
    assert r.returncode != 0 and "features.0.weight" in (r.stderr + r.stdout), r.stderr
    subprocess.run(["rm", "-rf", tmp])
    print("ok: 32 convolution tensors converted, file accepted by ichtriage")


if __name__ == "__main__":
    main()
