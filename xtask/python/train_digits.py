"""Trains the default model `digits_cnn` on the scikit-learn digits (8x8 grey images of handwritten
digits, 1,797 samples, shipped inside the scikit-learn wheel) with plain numpy, and writes its
weights and data for `cargo xtask models` to assemble into ONNX.

Network (NCHW): Conv 3x3 1->8 (pad 1) -> Clip(0, 6) -> depthwise Conv 3x3 (pad 1) -> Clip(0, 6)
-> Conv 1x1 8->8 -> Add (residual from the first Clip) -> AveragePool 2x2 -> Flatten -> Gemm 128->10.
Split: a seeded permutation; the last 500 samples are held out (the first 100 of them are the
calibration set, the other 400 the evaluation set); the rest train (Adam, cross-entropy).

Usage: train_digits.py OUT_DIR   (writes one .npy per weight, calib.npy, eval.npy, labels.npy)
"""
import sys

import numpy as np
from sklearn.datasets import load_digits


def patches(x):
    """3x3, pad 1 neighbourhoods: [N, C, H, W] -> [N, C, 9, H*W]."""
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.empty((n, c, 9, h * w), dtype=x.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        out[:, :, k, :] = p[:, :, i:i + h, j:j + w].reshape(n, c, h * w)
    return out


def unpatch(g, shape):
    """Adjoint of `patches`: [N, C, 9, H*W] -> [N, C, H, W]."""
    n, c, h, w = shape
    p = np.zeros((n, c, h + 2, w + 2), dtype=g.dtype)
    for k in range(9):
        i, j = divmod(k, 3)
        p[:, :, i:i + h, j:j + w] += g[:, :, k, :].reshape(n, c, h, w)
    return p[:, :, 1:-1, 1:-1]


def forward(params, x):
    w1, b1, w2, b2, w3, b3, w4, b4 = params
    n = x.shape[0]
    px = patches(x)                                                    # [N,1,9,64]
    c1 = np.einsum("ok,nkp->nop", w1.reshape(8, 9), px[:, 0]) + b1[None, :, None]
    a1 = np.clip(c1, 0, 6)                                             # [N,8,64]
    pa = patches(a1.reshape(n, 8, 8, 8))                               # [N,8,9,64]
    d = np.einsum("ck,nckp->ncp", w2.reshape(8, 9), pa) + b2[None, :, None]
    a2 = np.clip(d, 0, 6)
    p = np.einsum("oc,ncp->nop", w3.reshape(8, 8), a2) + b3[None, :, None]
    r = p + a1                                                         # [N,8,64]
    q = r.reshape(n, 8, 4, 2, 4, 2).mean(axis=(3, 5))                  # [N,8,4,4]
    f = q.reshape(n, 128)
    logits = f @ w4.T + b4
    return logits, (px, c1, a1, pa, d, a2, r, f)


def grads(params, x, y):
    w1, b1, w2, b2, w3, b3, w4, b4 = params
    n = x.shape[0]
    logits, (px, c1, a1, pa, d, a2, r, f) = forward(params, x)
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    loss = -np.log(prob[np.arange(n), y] + 1e-12).mean()
    g = prob
    g[np.arange(n), y] -= 1
    g /= n                                                             # dL/dlogits
    gw4 = g.T @ f
    gb4 = g.sum(axis=0)
    gf = g @ w4                                                        # [N,128]
    gq = gf.reshape(n, 8, 4, 1, 4, 1)
    gr = np.broadcast_to(gq, (n, 8, 4, 2, 4, 2)).reshape(n, 8, 64) / 4.0
    gp = gr
    gw3 = np.einsum("nop,ncp->oc", gp, a2).reshape(8, 8, 1, 1)
    gb3 = gp.sum(axis=(0, 2))
    ga2 = np.einsum("oc,nop->ncp", w3.reshape(8, 8), gp)
    gd = ga2 * ((d > 0) & (d < 6))
    gw2 = np.einsum("ncp,nckp->ck", gd, pa).reshape(8, 1, 3, 3)
    gb2 = gd.sum(axis=(0, 2))
    gpa = np.einsum("ck,ncp->nckp", w2.reshape(8, 9), gd)
    ga1 = gr + unpatch(gpa, (n, 8, 8, 8)).reshape(n, 8, 64)
    gc1 = ga1 * ((c1 > 0) & (c1 < 6))
    gw1 = np.einsum("nop,nkp->ok", gc1, px[:, 0]).reshape(8, 1, 3, 3)
    gb1 = gc1.sum(axis=(0, 2))
    return loss, [gw1, gb1, gw2, gb2, gw3, gb3, gw4, gb4]


def main():
    out = sys.argv[1]
    digits = load_digits()
    x = (digits.images.astype(np.float64) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(20261124)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    train_x, train_y = x[:-500], y[:-500]
    held_x, held_y = x[-500:], y[-500:]

    def init(shape, fan_in):
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)

    params = [
        init((8, 1, 3, 3), 9), np.zeros(8),
        init((8, 1, 3, 3), 9), np.zeros(8),
        init((8, 8, 1, 1), 8), np.zeros(8),
        init((10, 128), 128), np.zeros(10),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    lr, b1, b2, t = 3e-3, 0.9, 0.999, 0
    for epoch in range(40):
        perm = rng.permutation(len(train_y))
        for s in range(0, len(perm), 64):
            idx = perm[s:s + 64]
            loss, gs = grads(params, train_x[idx], train_y[idx])
            t += 1
            for k, g in enumerate(gs):
                m[k] = b1 * m[k] + (1 - b1) * g
                v[k] = b2 * v[k] + (1 - b2) * g * g
                mh, vh = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                params[k] = params[k] - lr * mh / (np.sqrt(vh) + 1e-8)
        if epoch % 10 == 9:
            acc = (forward(params, held_x[100:])[0].argmax(axis=1) == held_y[100:]).mean()
            print(f"epoch {epoch + 1}: loss {loss:.4f}, evaluation top-1 {acc:.4f}", file=sys.stderr)
    names = ["conv_w", "conv_b", "dw_w", "dw_b", "pw_w", "pw_b", "fc_w", "fc_b"]
    for n, p in zip(names, params):
        np.save(f"{out}/{n}.npy", p.astype(np.float32))
    np.save(f"{out}/calib.npy", held_x[:100].astype(np.float32))
    np.save(f"{out}/eval.npy", held_x[100:].astype(np.float32))
    np.save(f"{out}/labels.npy", held_y[100:])


if __name__ == "__main__":
    main()
