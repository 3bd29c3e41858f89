"""An independent float64 forward pass in plain NumPy, written from ARCHITECTURE.md (not from any
implementation's code), used to check the implementations' mathematics. Eval mode only."""

import numpy as np


def conv2d(x, weight, bias, pad):
    """x (N, C, H, W), weight (O, C, k, k) -> (N, O, H, W), stride 1, symmetric zero padding."""
    k = weight.shape[-1]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, w = x.shape[2] + 2 * pad - k + 1, x.shape[3] + 2 * pad - k + 1
    out = np.zeros((x.shape[0], weight.shape[0], h, w))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, dy : dy + h, dx : dx + w], weight[:, :, dy, dx])
    return out + bias[None, :, None, None]


def batch_norm_eval(x, t, prefix, eps=1e-5):
    def channel(v):
        return v[None, :, None, None]

    scale = t[f"{prefix}.weight"] / np.sqrt(t[f"{prefix}.running_var"] + eps)
    return (x - channel(t[f"{prefix}.running_mean"])) * channel(scale) + channel(t[f"{prefix}.bias"])


def relu(x):
    return np.maximum(x, 0.0)


def conv_block(x, t, prefix):
    x = relu(batch_norm_eval(conv2d(x, t[f"{prefix}.0.weight"], t[f"{prefix}.0.bias"], 1), t, f"{prefix}.1"))
    return relu(batch_norm_eval(conv2d(x, t[f"{prefix}.3.weight"], t[f"{prefix}.3.bias"], 1), t, f"{prefix}.4"))


def max_pool(x):
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def interpolation_matrix(n):
    """(2n, n) matrix of bilinear align_corners=True weights: output i samples i*(n-1)/(2n-1)."""
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
    return np.einsum("ih,nchw,jw->ncij", mh, x, mw)


def pad_to(x, h, w):
    dh, dw = h - x.shape[2], w - x.shape[3]
    return np.pad(x, ((0, 0), (0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)))


def forward(tensors, x):
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    x = np.asarray(x, np.float64)
    depth = sum(1 for k in t if k.startswith("e") and k.endswith(".conv.conv.0.weight"))
    skips = []
    for i in range(1, depth + 1):
        s = conv_block(x, t, f"e{i}.conv.conv")
        skips.append(s)
        x = max_pool(s)
    x = conv_block(x, t, "b1.conv")
    for j in range(1, depth + 1):
        s = skips[-j]
        x = pad_to(upsample(x), s.shape[2], s.shape[3])
        ag = f"d{j}.ag"
        g = batch_norm_eval(conv2d(x, t[f"{ag}.Wg.0.weight"], t[f"{ag}.Wg.0.bias"], 0), t, f"{ag}.Wg.1")
        q = batch_norm_eval(conv2d(s, t[f"{ag}.Ws.0.weight"], t[f"{ag}.Ws.0.bias"], 0), t, f"{ag}.Ws.1")
        a = 1 / (1 + np.exp(-conv2d(relu(g + q), t[f"{ag}.output.0.weight"], t[f"{ag}.output.0.bias"], 0)))
        x = conv_block(np.concatenate([x, a * s], axis=1), t, f"d{j}.c1.conv")
    return conv2d(x, t["output.weight"], t["output.bias"], 0)
