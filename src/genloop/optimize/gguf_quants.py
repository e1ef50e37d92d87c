"""Q4_K and Q6_K quantizers in numpy, for ``genloop export --format gguf --quant q4_k_m``.

The ``gguf`` package (0.19) writes Q8_0, Q4_0 and Q5_0 but only *reads* the k-quants
(``gguf.quants.Q4_K.dequantize_blocks``); these functions write them, byte for byte in the
layout that reader and llama.cpp's ``ggml-quants.c`` (``block_q4_K``, ``block_q6_K``) read.
Both work on super-blocks of ``QK_K = 256`` weights along a row:

``Q4_K`` (144 bytes, 4.5 bits a weight)::

    d: fp16 | dmin: fp16 | scales: 12 bytes | qs: 128 bytes
    8 sub-blocks of 32, x ≈ d·sc_j·q − dmin·m_j  (q in 0..15; sc_j, m_j 6-bit)
    scales: bytes 0-3 low 6 bits sc_0..3, bytes 4-7 low 6 bits m_0..3; bytes 8-11 hold
    sc_4..7 (low nibble) and m_4..7 (high nibble), their top 2 bits in bits 6-7 of
    bytes 0-3 (sc) and 4-7 (m)
    qs: per 64 weights, 32 bytes: low nibble weight l, high nibble weight l + 32

``Q6_K`` (210 bytes, 6.56 bits a weight)::

    ql: 128 bytes | qh: 64 bytes | scales: 16 int8 | d: fp16
    16 sub-blocks of 16, x ≈ d·sc_j·(q − 32)  (q in 0..63; sc_j signed 8-bit)
    per 128 weights: ql[l] = low4(q_l) | low4(q_l+64) << 4,
    ql[l + 32] = low4(q_l+32) | low4(q_l+96) << 4,
    qh[l] = high2(q_l) | high2(q_l+32) << 2 | high2(q_l+64) << 4 | high2(q_l+96) << 6

The scale search follows llama.cpp's reference quantizers (``quantize_row_q4_K_ref`` with
``make_qkx2_quants``: a weighted least-squares scale and min over 21 trial grids per
sub-block; ``quantize_row_q6_K_ref`` with ``make_qx_quants``: 19 trial symmetric grids,
weights x², the sign chosen so the largest magnitude lands on the −32 end), vectorized over
all sub-blocks at once. It is not bit-exact to llama.cpp (rounding ties, float order), and
needs no importance matrix: the same recipe ``llama-quantize`` follows without ``--imatrix``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

QK_K = 256  # weights per super-block
Q4_K_BYTES = 144
Q6_K_BYTES = 210
_CHUNK = 8192  # super-blocks at a time: bounds the search's temporaries (~100 MB)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """``data`` (..., n) float, n a multiple of 256 → uint8 (..., n / 256 · 144)."""
    return _by_rows(data, _q4_k_blocks, Q4_K_BYTES)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """``data`` (..., n) float, n a multiple of 256 → uint8 (..., n / 256 · 210)."""
    return _by_rows(data, _q6_k_blocks, Q6_K_BYTES)


def _by_rows(
    data: np.ndarray, blocks_fn: Callable[[np.ndarray], np.ndarray], nbytes: int
) -> np.ndarray:
    if data.shape[-1] % QK_K:
        raise ValueError(f"rows of {data.shape[-1]} weights are not a multiple of {QK_K}")
    blocks = np.asarray(data, dtype=np.float32).reshape(-1, QK_K)  # (B, 256)
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK):
        out[start : start + _CHUNK] = blocks_fn(blocks[start : start + _CHUNK])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * nbytes)


def _fp16(x: np.ndarray) -> np.ndarray:
    """The float32 value that storing ``x`` as fp16 keeps (what the reader will see)."""
    return x.astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------- Q4_K


def _q4_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 8, 32)  # (B, 8, 32)
    # 1. per sub-block scale and min (make_qkx2_quants: nmax 15, rmin -1, rdelta 0.1, 20 steps)
    av_x = np.sqrt((sub**2).mean(axis=-1, keepdims=True))
    weights = av_x + np.abs(sub)  # favours the larger weights, never zero in a live block
    scale, the_min = _qkx2(sub, weights, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)  # (B, 8)
    # 2. the scales and mins as 6-bit multiples of one fp16 d and dmin per super-block
    max_scale = scale.max(axis=1, keepdims=True)  # (B, 1)
    max_min = the_min.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, 63.0 / max_scale, 0.0)
        inv_min = np.where(max_min > 0, 63.0 / max_min, 0.0)
    ls = np.minimum(63, np.rint(inv_scale * scale)).astype(np.uint8)  # (B, 8)
    lm = np.minimum(63, np.rint(inv_min * the_min)).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)  # (B, 1)
    dmin = (max_min / 63.0).astype(np.float16)
    # 3. the 4-bit quants against the scales as the reader will see them
    d_sub = (d.astype(np.float32) * ls)[..., None]  # (B, 8, 1)
    m_sub = (dmin.astype(np.float32) * lm)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d_sub > 0, np.rint((sub + m_sub) / d_sub), 0.0)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)  # (B, 128)
    # 4. the 12 scale bytes
    scales = np.empty((n, 12), dtype=np.uint8)
    scales[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    scales[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), scales, qs], axis=1)


def _qkx2(
    x: np.ndarray, w: np.ndarray, *, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray]:
    """x ≈ scale·q − min with q in 0..nmax, fitted per row of ``x`` (..., n) by weighted
    least squares on the grids (nmax + rmin + rdelta·i) / (max − min), i = 0..nstep;
    returns ``(scale, min)`` (..., ), both ≥ 0 (min is the negated offset, as llama.cpp)."""
    lo = np.minimum(x.min(axis=-1), 0.0)  # the offset never goes above 0
    hi = x.max(axis=-1)
    span = hi - lo
    flat = span == 0  # all zeros, or all one negative value: the offset alone holds it
    span = np.where(flat, 1.0, span)
    sum_w = w.sum(axis=-1)
    sum_x = (w * x).sum(axis=-1)

    def error(scale: np.ndarray, offset: np.ndarray, q: np.ndarray) -> np.ndarray:
        diff = scale[..., None] * q + offset[..., None] - x
        total: np.ndarray = (w * diff * diff).sum(axis=-1)
        return total

    best_scale = span / nmax
    best_min = lo
    q = np.clip(np.rint((x - lo[..., None]) * (nmax / span)[..., None]), 0, nmax)
    best = error(best_scale, best_min, q)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        q = np.clip(np.rint((x - lo[..., None]) * iscale[..., None]), 0, nmax)
        sum_l = (w * q).sum(axis=-1)
        sum_l2 = (w * q * q).sum(axis=-1)
        sum_xl = (w * q * x).sum(axis=-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = offset > 0  # an offset above 0: refit the scale with none
        scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        offset = np.where(positive, 0.0, offset)
        err = error(scale, offset, q)
        better = ok & (err < best)
        best = np.where(better, err, best)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, offset, best_min)
    best_scale = np.where(flat, 0.0, np.maximum(best_scale, 0.0))
    return best_scale, -best_min


# ---------------------------------------------------------------------------- Q6_K


def _q6_k_blocks(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    sub = x.reshape(n, 16, 16)  # (B, 16, 16)
    # 1. a signed scale per sub-block (make_qx_quants: nmax 32, weights x²)
    scale = _qx(sub, nmax=32)  # (B, 16)
    # 2. the scales as int8 multiples of one fp16 d; the largest magnitude is -128
    pick = np.abs(scale).argmax(axis=1)
    max_scale = np.take_along_axis(scale, pick[:, None], axis=1)  # (B, 1)
    live = np.abs(max_scale) >= 1e-15  # llama.cpp's GROUP_MAX_EPS: else the block is 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(live, -128.0 / np.where(live, max_scale, 1.0), 0.0)
    d = np.where(live, 1.0 / np.where(live, iscale, 1.0), 0.0).astype(np.float16)  # (B, 1)
    sc = np.clip(np.rint(iscale * scale), -128, 127).astype(np.int8)  # (B, 16)
    # 3. the 6-bit quants against the scales as stored
    d_sub = (d.astype(np.float32) * sc)[..., None]  # (B, 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d_sub != 0, np.rint(sub / d_sub), 0.0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # (B, half, quarter, l)
    ql = np.concatenate(
        [
            q[:, :, 0] & 0x0F | (q[:, :, 2] & 0x0F) << 4,
            q[:, :, 1] & 0x0F | (q[:, :, 3] & 0x0F) << 4,
        ],
        axis=2,
    ).reshape(n, 128)
    qh = q[:, :, 0] >> 4 | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    qh = qh.reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)


def _qx(x: np.ndarray, *, nmax: int) -> np.ndarray:
    """x ≈ scale·q with q in −nmax..nmax−1, fitted per row of ``x`` (..., n): the grids
    −(nmax + 0.1·i) / xmax, i = −9..9, where xmax is the value of largest magnitude (so it
    lands on −nmax, the end with the extra level), each refitted by least squares with
    weights x²; returns the scale of the grid with the smallest weighted error (..., )."""
    pick = np.abs(x).argmax(axis=-1)[..., None]
    xmax = np.take_along_axis(x, pick, axis=-1)[..., 0]
    live = np.abs(xmax) >= 1e-15
    xmax = np.where(live, xmax, 1.0)
    w = x * x
    best_scale = np.zeros(x.shape[:-1], dtype=np.float64)
    best = np.full(x.shape[:-1], -np.inf)  # sumlx²/suml2: larger is a smaller error
    for i in range(-9, 10):
        iscale = -(nmax + 0.1 * i) / xmax
        q = np.clip(np.rint(x * iscale[..., None]), -nmax, nmax - 1)
        sum_lx = (w * x * q).sum(axis=-1)
        sum_l2 = (w * q * q).sum(axis=-1)
        ok = sum_l2 > 0
        safe = np.where(ok, sum_l2, 1.0)
        gain = np.where(ok, sum_lx * sum_lx / safe, -np.inf)
        better = gain > best
        best = np.where(better, gain, best)
        best_scale = np.where(better, sum_lx / safe, best_scale)
    return np.where(live, best_scale, 0.0)
