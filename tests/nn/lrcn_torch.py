"""The PyTorch module that matches ichtriage's model files (docs/model-format.md).

LRCN(arch=...) has exactly the state_dict names and layouts nn/ reads and
writes; save_model() writes a safetensors file nn_model_load() accepts. Also
a small safetensors reader/writer, so that no package beyond torch is needed.
Run with Debian's /usr/bin/python3 (python3-torch).
"""
import json
import struct

import torch
from torch import nn

PRESETS = {
    "small": "b32,M,b64,M,b128,M,b256,M,b256,G|",
    "vgg19": "c64,c64,M,c128,c128,M,c256,c256,c256,c256,M,c512,c512,c512,c512,M,"
             "c512,c512,c512,c512,M,F|d1000,D0.5,d1000",
}
LABELS = "any,epidural,intraparenchymal,intraventricular,subarachnoid,subdural"


def _conv_token(tok):
    """'c64' / 'b64k5s2p1' -> (bn, out, k, stride, pad)."""
    bn, rest = tok[0] == "b", tok[1:]
    vals, key, num = {}, "n", ""
    for ch in rest + "$":
        if ch.isdigit():
            num += ch
            continue
        vals[key] = int(num)
        key, num = ch, ""
    k = vals.get("k", 3)
    return bn, vals["n"], k, vals.get("s", 1), vals.get("p", k // 2)


class CNN(nn.Module):
    """features (nn.Sequential) then classifier (nn.Sequential ending in Linear(., labels))."""

    def __init__(self, spec, in_c=3, in_hw=(128, 128), labels=6):
        super().__init__()
        spec = PRESETS.get(spec, spec)
        feat_s, cls_s = spec.split("|")
        layers, c, (h, w) = [], in_c, in_hw
        for tok in filter(None, feat_s.split(",")):
            if tok[0] in "cb":
                bn, oc, k, s, p = _conv_token(tok)
                layers.append(nn.Conv2d(c, oc, k, s, p))
                if bn:
                    layers.append(nn.BatchNorm2d(oc))
                layers.append(nn.ReLU(inplace=True))
                c, h, w = oc, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            elif tok[0] == "M":
                k = int(tok[1:] or 2)
                layers.append(nn.MaxPool2d(k, k))
                h, w = (h - k) // k + 1, (w - k) // k + 1
            elif tok == "G":
                layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
                h = w = 1
            elif tok == "GM":
                layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
                h = w = 1
            elif tok == "F":
                layers.append(nn.Flatten())
                c, h, w = c * h * w, 1, 1
            else:
                raise ValueError(tok)
        self.features = nn.Sequential(*layers)
        self.feature_size = c
        cls = []
        for tok in filter(None, cls_s.split(",")):
            if tok[0] == "d":
                cls += [nn.Linear(c, int(tok[1:])), nn.ReLU(inplace=True)]
                c = int(tok[1:])
            elif tok[0] == "D":
                cls.append(nn.Dropout(float(tok[1:])))
            else:
                raise ValueError(tok)
        cls.append(nn.Linear(c, labels))
        self.classifier = nn.Sequential(*cls)
        for mod in self.features:
            if isinstance(mod, nn.Conv2d):  # as torchvision's VGG, and nn/ does
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    def forward(self, x):  # stage 1: one logit per label per slice
        return self.classifier(self.features(x))


class LRCN(nn.Module):
    """cnn per slice, BiLSTM across the slices of each series, dense head per step.

    forward(x, lengths): x [sum(lengths), C, H, W], the slices of all series
    back to back; returns logits [sum(lengths), labels] in the same order.
    """

    def __init__(self, arch="small", in_c=3, in_hw=(128, 128), labels=6, hidden=100,
                 dense=100, dropout=0.5):
        super().__init__()
        self.arch, self.in_c, self.in_hw = arch, in_c, in_hw
        self.cnn = CNN(arch, in_c, in_hw, labels)
        self.lstm = nn.LSTM(self.cnn.feature_size, hidden, batch_first=True, bidirectional=True)
        self.dense = nn.Sequential(
            nn.Linear(2 * hidden, dense), nn.BatchNorm1d(dense), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(dense, dense), nn.BatchNorm1d(dense), nn.ReLU(), nn.Dropout(dropout))
        self.out = nn.Linear(dense, labels)
        self.hidden, self.dense_width, self.dropout, self.labels = hidden, dense, dropout, labels

    def sequence(self, feat, lengths):
        """feat [N, F] packed by series -> BiLSTM output [N, 2H] in the same order."""
        seqs = list(torch.split(feat, list(lengths)))
        packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False)
        out, _ = self.lstm(packed)
        pad, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        return torch.cat([pad[i, :n] for i, n in enumerate(lengths)])

    def forward(self, x, lengths):
        return self.out(self.dense(self.sequence(self.cnn.features(x), lengths)))

    def metadata(self, **extra):
        meta = {
            "format": "ichtriage-lrcn-1", "arch": self.arch,
            "input": f"{self.in_c}x{self.in_hw[0]}x{self.in_hw[1]}",
            "labels": LABELS, "lstm_hidden": str(self.hidden), "dense": str(self.dense_width),
            "dense_dropout": str(self.dropout), "windows": "40/80,80/200,600/2800",
            "thresholds": "0.5,0.5,0.5,0.5,0.5,0.5",
            "preprocessing": "hu=stored*slope+intercept;window=clamp01;resize=area",
        }
        meta.update(extra)
        return meta


# ---- safetensors --------------------------------------------------------------
_DT = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32", torch.float64: "F64"}
_TD = {v: k for k, v in _DT.items()}


def save_safetensors(path, tensors, metadata=None):
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)))
        f.write(js)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base, out = 8 + n, {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        buf = bytearray(data[base + b:base + e])
        out[name] = torch.frombuffer(buf, dtype=_TD[h["dtype"]]).reshape(h["shape"]).clone()
    return out, meta


def save_model(model, path, **extra_meta):
    save_safetensors(path, model.state_dict(), model.metadata(**extra_meta))


def load_model(path):
    sd, meta = load_safetensors(path)
    c, h, w = (int(v) for v in meta["input"].split("x"))
    model = LRCN(meta["arch"], c, (h, w), len(meta["labels"].split(",")),
                 int(meta["lstm_hidden"]), int(meta["dense"]), float(meta["dense_dropout"]))
    model.load_state_dict(sd)
    return model, meta
