"""Independent numpy references the tests compare against (float64, loops where clearer)."""

import numpy as np


def attention(q, k, v, mask=None, bias=None):
    """Naive softmax attention, one (batch, head) at a time. q [B,T,N,H], k/v [B,S,K,H]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, H = q.shape
    K = k.shape[2]
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)  # query head n shares kv head n // group
            logits = q[b, :, n] @ k[b, :, kv].T / np.sqrt(H)
            if bias is not None:
                logits = (
                    logits
                    + np.asarray(bias, np.float64)[min(b, bias.shape[0] - 1), min(n, bias.shape[1] - 1)]
                )
            if mask is not None:
                m = np.asarray(mask)[min(b, mask.shape[0] - 1), min(n, mask.shape[1] - 1)]
                logits = np.where(m, logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[b, :, n] = (p / p.sum(-1, keepdims=True)) @ v[b, :, kv]
    return out


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
