"""The torch CRF's fused CUDA kernels (Triton): the lattice's splat, blur and slice, and one mean-field step.

Their own module so that only the torch CRF's path imports Triton: the CPU workers that run pydensecrf import
``scosparc_core.crf`` without it. The launchers (``PermutohedralLattice._filter_triton``, ``crf._fused_step``) say
how each is called; every kernel runs with FMA off, so each product is rounded as in pydensecrf's C++.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except Exception:  # not installed (CPU workers), or unusable: the torch ops then
    triton = None

if triton is None:
    splat_kernel = blur_kernel = slice_kernel = mean_field_step_kernel = None
else:

    @triton.jit
    def splat_kernel(values, points, weights, offsets, out, n, channels, BLOCK: tl.constexpr):
        """out[row, c] = Σ_e weights[e]·values[points[e], c] over the row's entries, in entry order."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        row = i // channels
        c = i % channels
        start = tl.load(offsets + row, mask=live, other=0)
        count = tl.load(offsets + row + 1, mask=live, other=0) - start
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, tl.max(count, axis=0)):
            take = live & (k < count)
            point = tl.load(points + start + k, mask=take, other=0).to(tl.int64)
            w = tl.load(weights + start + k, mask=take, other=0.0)
            v = tl.load(values + point * channels + c, mask=take, other=0.0)
            acc = tl.where(take, acc + w * v, acc)
        tl.store(out + i, acc, mask=live)

    @triton.jit
    def blur_kernel(src, dst, neighbours, n, channels, BLOCK: tl.constexpr):
        """dst[row] = src[row] + 0.5·(src[n1] + src[n2]); row 0 (n1 = n2 = 0, value 0) stays 0."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        row = i // channels
        c = i % channels
        n1 = tl.load(neighbours + 2 * row, mask=live, other=0).to(tl.int64)
        n2 = tl.load(neighbours + 2 * row + 1, mask=live, other=0).to(tl.int64)
        a = tl.load(src + n1 * channels + c, mask=live, other=0.0)
        b = tl.load(src + n2 * channels + c, mask=live, other=0.0)
        old = tl.load(src + i, mask=live, other=0.0)
        tl.store(dst + i, old + (a + b) * 0.5, mask=live)

    @triton.jit
    def slice_kernel(src, rows, weights, out, n, channels, alpha, D1: tl.constexpr, BLOCK: tl.constexpr):
        """out[p, c] = Σ_r (weights[p, r]·src[rows[p, r], c])·alpha, r = 0..d in order."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        point = i // channels
        c = i % channels
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for r in tl.static_range(D1):
            vertex = tl.load(rows + point * D1 + r, mask=live, other=0).to(tl.int64)
            w = tl.load(weights + point * D1 + r, mask=live, other=0.0)
            v = tl.load(src + vertex * channels + c, mask=live, other=0.0)
            acc = acc + (w * v) * alpha
        tl.store(out + i, acc, mask=live)

    @triton.jit
    def mean_field_step_kernel(filtered_gauss, filtered_bilateral, s_gauss, s_bilateral, fg, q_out,
                                gauss_out, bilateral_out, expf_constants, expf_table, n, batch, minus_given,
                                minus_other, minus_wg, minus_wb, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # image-major pixel: b·N + p
        live = i < batch * n
        image = i // n
        g = (i % n) * batch + image  # the same pixel in the Gaussian layout (N, B)
        sg = tl.load(s_gauss + i % n, mask=live, other=0.0)
        sb = tl.load(s_bilateral + i, mask=live, other=0.0)
        is_fg = tl.load(fg + i, mask=live, other=0) != 0
        t0 = tl.where(is_fg, minus_other, minus_given)
        t1 = tl.where(is_fg, minus_given, minus_other)
        t0 = t0 - (tl.load(filtered_gauss + 2 * g, mask=live, other=0.0) * sg) * minus_wg
        t1 = t1 - (tl.load(filtered_gauss + 2 * g + 1, mask=live, other=0.0) * sg) * minus_wg
        t0 = t0 - (tl.load(filtered_bilateral + 2 * i, mask=live, other=0.0) * sb) * minus_wb
        t1 = t1 - (tl.load(filtered_bilateral + 2 * i + 1, mask=live, other=0.0) * sb) * minus_wb
        delta = t1 - t0
        # glibc expf of min - max = -|delta|, in double (see _expf).
        z = (-tl.abs(delta)).to(tl.float64) * tl.load(expf_constants)
        shift = tl.load(expf_constants + 5)
        kd = (z + shift) - shift  # round to nearest, ties to even
        r = z - kd
        k = kd.to(tl.int64)
        idx = k & 31
        scale = (tl.load(expf_table + idx, mask=live, other=0) + (k - idx) * 140737488355328).to(
            tl.float64, bitcast=True)  # 2^(k/32); 140737488355328 = 2^47
        c0 = tl.load(expf_constants + 1)
        c1 = tl.load(expf_constants + 2)
        c2 = tl.load(expf_constants + 3)
        one = tl.load(expf_constants + 4)
        e = (((r * c0 + c1) * (r * r) + (r * c2 + one)) * scale).to(tl.float32)
        # IEEE division: Triton's '/' on float32 is the approximate one.
        sum_e = 1.0 + e
        big = tl.math.div_rn(tl.full((BLOCK,), 1.0, tl.float32), sum_e)
        small = tl.math.div_rn(e, sum_e)
        ahead = delta > 0
        q0 = tl.where(ahead, small, big)
        q1 = tl.where(ahead, big, small)
        tl.store(q_out + 2 * i, q0, mask=live)
        tl.store(q_out + 2 * i + 1, q1, mask=live)
        tl.store(gauss_out + 2 * g, q0 * sg, mask=live)
        tl.store(gauss_out + 2 * g + 1, q1 * sg, mask=live)
        tl.store(bilateral_out + 2 * i, q0 * sb, mask=live)
        tl.store(bilateral_out + 2 * i + 1, q1 * sb, mask=live)
