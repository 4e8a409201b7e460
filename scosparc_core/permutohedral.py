"""The permutohedral lattice (Adams, Baek & Davis 2010) in torch, batched, as pydensecrf's C++ builds and applies it.

A lattice is built once from float32 features ``(P, d)`` (P points in d dimensions), optionally split into
independent groups (one per image, so that a whole batch is one lattice), and then filters values ``(P, C)``:
splat with barycentric weights, blur along each of the d+1 lattice axes in turn with the kernel (0.5, 1, 0.5),
slice with the same weights and the factor 1/(1+2^-d).

Hand-written because no library computes pydensecrf's numbers: the GPU lattices in the wild (MiguelMonteiro's
permutohedral_lattice, heiwang1997/DenseCRF, MONAI, WarpConvNet, ConvCRF) normalise differently, truncate the
window or blur in place. The construction follows pydensecrf's ``permutohedral.cpp`` (its SSE build, the one
x86 machines compile) step by step, so that the lattice -- vertex set, neighbours, weights -- is the same:

- scale factors float32((d+1)·sqrt(2/3) / sqrt((j+1)(j+2))), elevation in float32 in the C++ order;
- the nearest remainder-0 point rounds half to even (SSE ``cvtps2dq``/``roundps`` with round-to-nearest);
- the rank is the position in a *stable* descending sort of ``elevated - rem0`` (equal differences: the lower
  coordinate index ranks first), then the sum correction wraps ranks and remainders;
- every point inserts all d+1 vertices, zero barycentric weight or not: they relay values during the blur;
- when a group's point count is not a multiple of 4, the SSE build also inserts the vertices of a zero feature
  vector (its padding lanes); they get no value but relay values too, so they are inserted here as well;
- the blur writes into a second buffer (missing neighbours count as 0) and runs over axes 0..d in order;
- the arithmetic is the C++'s, operation by operation in float32: splat sums w·value per vertex in point
  order, the blur computes old + 0.5·(n1 + n2), slicing sums (w·v)·alpha over the remainders in order. With
  the same lattice this gives pydensecrf's filter output to the bit (CPU and CUDA).

Vertices are found by sorting packed integer keys (group, remainder, lattice coordinates) instead of a hash
table; blur neighbours by ``searchsorted`` on the sorted keys. Filtering is torch gathers, a segment sum and
element-wise ops, or on CUDA one fused Triton kernel per step (FMA contraction off); int32 indices; no Python
loop over points or images.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .crf_kernels import blur_kernel, slice_kernel, splat_kernel, triton


class LatticeTooLarge(ValueError):
    """The points need wider keys or indices than one lattice has (64-bit keys, int32 indices): build it over
    fewer groups (images) at once; each group's lattice stays the same."""


def _scale_factors(d: int) -> list[float]:
    # C++: inv_std_dev is a float; 1.0/sqrt(double) * inv_std_dev in double, then stored as float.
    inv_std_dev = float(np.float32(math.sqrt(2.0 / 3.0) * (d + 1)))
    return [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std_dev)) for i in range(d)]


def _alpha(d: int) -> float:
    # C++: 1.0f / (1 + powf(2, -d)) in float.
    return float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0**-d)))


def _gather_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """values[rows] for (R, C) float32 values; pairs of floats move as one 8-byte word (much faster gathers)."""
    if values.shape[1] == 2:
        return values.view(torch.int64)[:, 0].index_select(0, rows).view(torch.float32).view(-1, 2)
    if values.shape[1] == 1:
        return values[:, 0].index_select(0, rows)[:, None]
    return values.index_select(0, rows)


@dataclass(frozen=True)
class PermutohedralLattice:
    """A built lattice over P points in d dimensions with M vertices.

    Rows refer to the blur buffer (M+1, C): row 0 is a constant zero (a missing neighbour), vertex v is row v+1.
    Tensors, all on one device, indices int32:
      splat_points  (E,)         the point of each (point, remainder) entry, entries sorted by vertex, then point
      splat_weights (E,) float32 its barycentric weight
      splat_offsets (M+2,)       where each row's entries start in the sorted entries (0, 0, ..., E)
      slice_rows    (P*(d+1),)   each point's vertex rows for remainders 0..d
      slice_weights (P, d+1) float32 the barycentric weights
      blur_rows     (d+1, M+1, 2) per axis, the rows of each row's two neighbours n1, n2 (0 when missing)
    """

    d: int
    num_points: int
    num_vertices: int
    splat_points: torch.Tensor
    splat_weights: torch.Tensor
    splat_offsets: torch.Tensor
    slice_rows: torch.Tensor
    slice_weights: torch.Tensor
    blur_rows: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.slice_rows.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.splat_points, self.splat_weights, self.splat_offsets,
                                                           self.slice_rows, self.slice_weights, self.blur_rows))

    def filter(self, values: torch.Tensor) -> torch.Tensor:
        """values (P, C) float32 -> (P, C) float32: splat, blur, slice (pydensecrf's ``compute``, not reversed).

        On CUDA each step is one fused Triton kernel (the same arithmetic, FMA contraction off); elsewhere, and
        without Triton, torch ops.
        """
        if values.dim() != 2 or values.shape[0] != self.num_points or values.dtype != torch.float32:
            raise ValueError(f"expected ({self.num_points}, C) float32 values, got {tuple(values.shape)} {values.dtype}")
        values = values.contiguous()
        if _use_triton(values):
            return self._filter_triton(values)
        return self._filter_torch(values)

    def _filter_torch(self, values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[1]
        # Splat: each vertex sums w·value over its entries in point order (segment_reduce runs a serial loop per
        # segment for 2-d data). Row 0 is an empty segment: the zero that missing neighbours read.
        contributions = _gather_rows(values, self.splat_points) * self.splat_weights[:, None]
        buffer = torch.segment_reduce(contributions, "sum", offsets=self.splat_offsets, axis=0, unsafe=True)
        del contributions
        # Blur: new = old + 0.5·(n1 + n2) into a second buffer, axis 0 to d.
        rows = self.num_vertices + 1
        for axis in range(self.d + 1):
            pair = _gather_rows(buffer, self.blur_rows[axis].view(-1)).view(rows, 2, channels)
            buffer = torch.add(buffer, pair[:, 0] + pair[:, 1], alpha=0.5)
        # Slice: out = Σ_r (w_r·v_r)·alpha, summed over r = 0..d in order, like the C++.
        gathered = _gather_rows(buffer, self.slice_rows).view(self.num_points, self.d + 1, channels)
        terms = (gathered * self.slice_weights[:, :, None]) * _alpha(self.d)
        out = terms[:, 0]
        for r in range(1, self.d + 1):
            out = out + terms[:, r]
        return out

    def _filter_triton(self, values: torch.Tensor) -> torch.Tensor:
        channels = values.shape[1]
        rows = self.num_vertices + 1
        launch = dict(BLOCK=_BLOCK, enable_fp_fusion=False)  # no FMA: every product is rounded, as in the C++
        buffer = values.new_empty(rows, channels)
        # The splat loops to the longest segment of its block: small blocks waste less on uneven segments.
        splat_kernel[(triton.cdiv(rows * channels, _SPLAT_BLOCK),)](
            values, self.splat_points, self.splat_weights, self.splat_offsets, buffer, rows * channels, channels,
            BLOCK=_SPLAT_BLOCK, enable_fp_fusion=False)
        grid = (triton.cdiv(rows * channels, _BLOCK),)
        other = torch.empty_like(buffer)
        for axis in range(self.d + 1):
            blur_kernel[grid](buffer, other, self.blur_rows[axis], rows * channels, channels, **launch)
            buffer, other = other, buffer
        del other
        out = values.new_empty(self.num_points, channels)
        slice_kernel[(triton.cdiv(self.num_points * channels, _BLOCK),)](
            buffer, self.slice_rows, self.slice_weights, out, self.num_points * channels, channels, _alpha(self.d),
            D1=self.d + 1, **launch)
        return out


_BLOCK = 512
_SPLAT_BLOCK = 128


def _use_triton(values: torch.Tensor) -> bool:
    # The interpreter (TRITON_INTERPRET=1) runs the same kernels on CPU tensors: that is how CI tests them.
    return triton is not None and (values.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _elevate(features: torch.Tensor) -> torch.Tensor:
    """(P, d) -> (P, d+1): y = E f, in float32 and in the C++ order of operations."""
    d = features.shape[1]
    scale = _scale_factors(d)
    elevated = [None] * (d + 1)
    sm = torch.zeros_like(features[:, 0])
    for j in range(d, 0, -1):
        cf = features[:, j - 1] * scale[j - 1]
        elevated[j] = sm - cf * float(j)
        sm = sm + cf
    elevated[0] = sm
    return torch.stack(elevated, dim=1)


def _simplex(features: torch.Tensor):
    """(P, d) float32 -> the enclosing simplex: rem0 / (d+1) as (P, d+1) int64, rank (P, d+1) int64 and the
    barycentric weights (P, d+1) float32, each step as the C++ computes it."""
    d = features.shape[1]
    elevated = _elevate(features)
    down = float(np.float32(1.0) / np.float32(d + 1))
    rounded = torch.round(elevated * down)  # half to even, like the SSE build
    rem0 = rounded * float(d + 1)
    coord_sum = rounded.sum(dim=1, keepdim=True)  # small integers: exact in any order
    diff = elevated - rem0
    # Rank = position in a stable descending sort: the number of larger differences, plus the equal ones at a
    # lower index (the C++ compares pairs i < j and counts i ahead unless diff_i < diff_j).
    rank = torch.empty(diff.shape, dtype=torch.int64, device=diff.device)
    for i in range(d + 1):
        own = diff[:, i : i + 1]
        ahead = (diff > own).sum(dim=1)
        if i:
            ahead += (diff[:, :i] == own).sum(dim=1)
        rank[:, i] = ahead
    rank = rank + coord_sum.to(rank.dtype)
    wrap = (rank < 0).to(rank.dtype) - (rank > d).to(rank.dtype)
    rank = rank + wrap * (d + 1)
    rem0 = rem0 + wrap.to(torch.float32) * float(d + 1)
    q0 = rounded.to(torch.int64) + wrap  # rem0 / (d+1)
    v = (elevated - rem0) * down
    # u[r] = v of the coordinate with rank r; barycentric[p] = u[d-p] - u[d-p+1], barycentric[0] wraps around.
    u = torch.empty_like(v).scatter_(1, rank, v)
    bary = torch.empty_like(v)
    bary[:, 1:] = u[:, :-1].flip(1) - u[:, 1:].flip(1)
    bary[:, 0] = u[:, d] + (1.0 - u[:, 0])
    return q0, rank, bary


def build_lattice(features: torch.Tensor, groups: int = 1) -> PermutohedralLattice:
    """features (P, d) float32, P = groups·n with group g in rows g·n .. g·n+n-1 -> the lattice over all points.

    Points of different groups never share a vertex: each group gets the lattice pydensecrf would build for
    it alone (its points in row order, padded to a multiple of 4 like the SSE build).
    """
    if features.dtype != torch.float32 or features.dim() != 2:
        raise ValueError("features must be a (P, d) float32 tensor")
    num_points, d = features.shape
    if groups < 1 or num_points % groups:
        raise ValueError(f"{num_points} points do not split into {groups} equal groups")
    device = features.device
    per_group = num_points // groups
    padded = per_group % 4 != 0
    if padded:  # the SSE build's padding lanes: a zero feature vector, one per group, splatting nothing
        features = torch.cat([features, features.new_zeros(groups, d)])
    group = torch.arange(groups, device=device)
    group = torch.cat([group.repeat_interleave(per_group), group]) if padded else group.repeat_interleave(per_group)
    q0, rank, bary = _simplex(features)
    del features

    # Vertex r of a point has key_i = rem0_i + r - (d+1)·[rank_i > d-r] (i < d): every coordinate is r mod (d+1),
    # so it packs as fields (group, r, q_0..q_{d-1}) with key_i = (d+1)·q_i + r, q_i = q0_i - [rank_i > d-r].
    # Each q field gets one spare value on both sides so that a blur neighbour's key (q changes by at most 1)
    # is plain integer addition that never spills into another field.
    q_low = (q0[:, :d] - (rank[:, :d] > 0).long()).amin(dim=0) - 1
    q_high = q0[:, :d].amax(dim=0) + 1
    widths = [max(1, (groups - 1).bit_length()), max(1, d.bit_length())]
    widths += [max(1, int(w).bit_length()) for w in (q_high - q_low).tolist()]
    if num_points * (d + 1) >= 2**31:
        raise LatticeTooLarge(f"{num_points} points need more than int32 indices: filter fewer images at once")
    if sum(widths) > 63:
        raise LatticeTooLarge(f"lattice keys need {sum(widths)} bits: filter fewer images at once")
    shifts = [sum(widths[k + 1 :]) for k in range(len(widths))]
    q_units = torch.tensor([1 << s for s in shifts[2:]], dtype=torch.int64, device=device)  # (d,)
    base = (group << shifts[0]) + ((q0[:, :d] - q_low) * q_units).sum(dim=1)  # (P',)
    del q0
    # Σ_i [rank_i > d-r]·unit_i for r = 0..d: the units of the coordinates ranked d, d-1, .., d-r+1, cumulated.
    by_rank = torch.zeros_like(rank).scatter_(1, rank[:, :d], q_units.expand(rank.shape[0], d))
    keys = torch.empty_like(rank)  # (P', d+1)
    keys[:, 0] = base
    for r in range(1, d + 1):  # vertex r drops the unit of the coordinate ranked d-r+1 on top of vertex r-1's
        keys[:, r] = keys[:, r - 1] + ((1 << shifts[1]) - by_rank[:, d - r + 1])
    keys = keys.view(-1)
    del base, by_rank, rank

    sorted_keys, order = torch.sort(keys, stable=True)
    del keys
    is_new = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=is_new[1:])
    starts = is_new.nonzero()[:, 0]
    vertex_keys = sorted_keys[starts]
    num_vertices = vertex_keys.numel()
    entries = sorted_keys.numel()
    del sorted_keys
    vertex_of_sorted = torch.cumsum(is_new, 0, dtype=torch.int32) - 1
    del is_new
    slice_rows = torch.empty(entries, dtype=torch.int32, device=device)
    slice_rows.scatter_(0, order, vertex_of_sorted + 1)
    del vertex_of_sorted

    splat_points = torch.div(order, d + 1, rounding_mode="floor")
    splat_weights = bary.reshape(-1)[order]
    if padded:  # padding points splat nothing: weight 0 on a real point keeps every segment in place
        pad = splat_points >= num_points
        splat_weights[pad] = 0.0
        splat_points[pad] = 0
    del order
    splat_points = splat_points.to(torch.int32)
    splat_offsets = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), entries)]).to(torch.int32)
    slice_rows = slice_rows[: num_points * (d + 1)]
    slice_weights = bary[:num_points].contiguous()

    # Blur neighbours along axis j: n1 = key - 1 + (d+1)·e_j, n2 = key + 1 - (d+1)·e_j (for j = d, the implied
    # last coordinate: key - 1 and key + 1). In fields: key - 1 lowers r by one, or for r = 0 sets r = d and
    # lowers every q by one. n1 is found by search; n2 is its inverse (n2(n1(v)) = v).
    unit_sum = sum(1 << s for s in shifts[2:])
    r_of_vertex = (vertex_keys >> shifts[1]) & ((1 << widths[1]) - 1)
    step_down = torch.where(r_of_vertex == 0, (d << shifts[1]) - unit_sum, -(1 << shifts[1]))
    del r_of_vertex
    rows = num_vertices + 1
    blur_rows = torch.zeros(d + 1, rows, 2, dtype=torch.int32, device=device)
    own_rows = torch.arange(1, rows, dtype=torch.int32, device=device)
    for axis in range(d + 1):
        query = vertex_keys + step_down
        if axis < d:
            query += 1 << shifts[2 + axis]
        pos = torch.searchsorted(vertex_keys, query, out_int32=True).clamp_(max=max(num_vertices - 1, 0))
        found = vertex_keys[pos] == query
        n1 = torch.where(found, pos + 1, 0)
        blur_rows[axis, 1:, 0] = n1
        blur_rows[axis, :, 1].scatter_(0, n1[found].long(), own_rows[found])
    return PermutohedralLattice(
        d=d,
        num_points=num_points,
        num_vertices=num_vertices,
        splat_points=splat_points,
        splat_weights=splat_weights,
        splat_offsets=splat_offsets,
        slice_rows=slice_rows,
        slice_weights=slice_weights,
        blur_rows=blur_rows,
    )
