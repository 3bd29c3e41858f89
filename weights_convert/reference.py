"""An independent float64 forward pass in plain NumPy, written from ARCHITECTURE.md and sharing no
code with any implementation: the reference every implementation's forward is compared with.

Eval mode uses the running statistics; train mode normalises with the batch statistics and
returns the updated running statistics (torch's rule: ``new = 0.9 * old + 0.1 * batch``, the
variance unbiased) as ``state/<name>``. NCHW arrays and canonical names throughout.
"""

from __future__ import annotations

import numpy as np

from weights_convert.spec import ModelConfig, infer_config

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch's convention: weight of the new batch statistic


def conv2d(x, weight, bias, pad):
    """x (N, C, H, W), weight (O, C, k, k) -> (N, O, H, W); stride 1, symmetric zero padding."""
    k = weight.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
    h, w = x.shape[2] + 2 * pad - k + 1, x.shape[3] + 2 * pad - k + 1
    out = np.zeros((x.shape[0], h, w, weight.shape[0]))
    for dy in range(k):
        for dx in range(k):
            window = xp[:, :, dy : dy + h, dx : dx + w]
            out += np.tensordot(window, weight[:, :, dy, dx], axes=([1], [1]))
    return out.transpose(0, 3, 1, 2) + bias[None, :, None, None]


class Forward:
    """One forward pass over canonical tensors; collects named block outputs and BN state."""

    def __init__(self, tensors: dict, train: bool):
        self.t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        self.counters = {k: np.asarray(v) for k, v in tensors.items() if k.endswith("num_batches_tracked")}
        self.train = train
        self.state: dict[str, np.ndarray] = {}

    def conv(self, x, prefix, pad):
        return conv2d(x, self.t[f"{prefix}.weight"], self.t[f"{prefix}.bias"], pad)

    def batch_norm(self, x, prefix):
        if self.train:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))  # biased: what normalises the batch
            unbiased = var * n / (n - 1)  # what torch stores in running_var
            old_mean, old_var = self.t[f"{prefix}.running_mean"], self.t[f"{prefix}.running_var"]
            self.state[f"{prefix}.running_mean"] = (1 - BN_MOMENTUM) * old_mean + BN_MOMENTUM * mean
            self.state[f"{prefix}.running_var"] = (1 - BN_MOMENTUM) * old_var + BN_MOMENTUM * unbiased
            self.state[f"{prefix}.num_batches_tracked"] = self.counters[f"{prefix}.num_batches_tracked"] + 1
        else:
            mean, var = self.t[f"{prefix}.running_mean"], self.t[f"{prefix}.running_var"]
        scale = self.t[f"{prefix}.weight"] / np.sqrt(var + BN_EPS)
        return (x - mean[None, :, None, None]) * scale[None, :, None, None] + self.t[f"{prefix}.bias"][
            None, :, None, None
        ]

    def conv_block(self, x, prefix):
        x = relu(self.batch_norm(self.conv(x, f"{prefix}.0", 1), f"{prefix}.1"))
        return relu(self.batch_norm(self.conv(x, f"{prefix}.3", 1), f"{prefix}.4"))

    def gate(self, g, s, prefix):
        a = relu(
            self.batch_norm(self.conv(g, f"{prefix}.Wg.0", 0), f"{prefix}.Wg.1")
            + self.batch_norm(self.conv(s, f"{prefix}.Ws.0", 0), f"{prefix}.Ws.1")
        )
        return sigmoid(self.conv(a, f"{prefix}.output.0", 0))

    def __call__(self, x, config: ModelConfig) -> dict[str, np.ndarray]:
        named: dict[str, np.ndarray] = {}
        skips = []
        for i in range(1, config.depth + 1):
            s = self.conv_block(x, f"e{i}.conv.conv")
            named[f"e{i}"] = s
            skips.append(s)
            x = max_pool(s)
        x = named["b1"] = self.conv_block(x, "b1.conv")
        for j in range(1, config.depth + 1):
            s = skips[-j]
            x = pad_to(upsample(x), s.shape[2], s.shape[3])
            a = named[f"d{j}.ag"] = self.gate(x, s, f"d{j}.ag")
            x = named[f"d{j}"] = self.conv_block(np.concatenate([x, a * s], axis=1), f"d{j}.c1.conv")
        named["output"] = self.conv(x, "output", 0)
        return named


def per_channel(v):
    return v[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def max_pool(x):
    """2x2, stride 2, floor for odd sizes."""
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def interpolation_matrix(n: int) -> np.ndarray:
    """(2n, n) bilinear weights with align_corners=True: output i samples input i*(n-1)/(2n-1)."""
    m = np.zeros((2 * n, n))
    for i in range(2 * n):
        src = i * (n - 1) / (2 * n - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def upsample(x):
    mh, mw = interpolation_matrix(x.shape[2]), interpolation_matrix(x.shape[3])
    return np.einsum("ih,nchw,jw->ncij", mh, x, mw, optimize=True)


def pad_to(x, h, w):
    """Zeros to the skip's size: d // 2 before, the rest after."""
    dh, dw = h - x.shape[2], w - x.shape[3]
    return np.pad(x, ((0, 0), (0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)))


def forward(tensors: dict, x, *, train: bool = False, config: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """Named block outputs (``e1``.., ``b1``, ``d1.ag``, ``d1``.., ``output``) in float64; in train
    mode also ``state/<name>`` for every running statistic after the pass."""
    config = config or infer_config({k: np.shape(v) for k, v in tensors.items()})
    run = Forward(tensors, train)
    named = run(np.asarray(x, dtype=np.float64), config)
    named.update({f"state/{k}": v for k, v in run.state.items()})
    return named
