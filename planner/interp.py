"""Interpolation of measured cost tables: piecewise linear in log-log space (step times follow
power laws in tokens and batch size far better than straight lines), extrapolated along the end
segments' slopes. One- and two-dimensional tables; the second axis may hold zeros (a cached
prefix of 0 tokens), so it is interpolated linearly.
"""
from __future__ import annotations

import bisect
import math


def _segment(xs: list[float], x: float) -> int:
    """Index i of the segment [xs[i], xs[i+1]] used for x (end segments extrapolate)."""
    i = bisect.bisect_right(xs, x) - 1
    return min(max(i, 0), len(xs) - 2)


def held_log_linear(points: list[tuple[float, float]], x: float | None) -> float:
    """y at `x` through `points` (x > 0, ascending; y any sign, zero included): linear in log x between
    neighbours and held at the end values beyond them (ratios and small times, not power laws: no log
    of y, no extrapolation); the last point's y without an `x`. Points of equal x count as one, their
    mean (a probe may list a length twice)."""
    if len({p for p, _ in points}) < len(points):
        merged: dict[float, list[float]] = {}
        for p, y in points:
            merged.setdefault(p, []).append(y)
        points = [(p, sum(ys) / len(ys)) for p, ys in merged.items()]
    if not x or len(points) == 1:
        return points[-1][1]
    lxs = [math.log(p) for p, _ in points]
    lx = min(max(math.log(x), lxs[0]), lxs[-1])
    i = _segment(lxs, lx)
    w = (lx - lxs[i]) / (lxs[i + 1] - lxs[i])
    return points[i][1] * (1 - w) + points[i + 1][1] * w


class Table1D:
    """y(x) through measured points (x > 0, y > 0), log-log piecewise linear."""

    def __init__(self, xs: list[float], ys: list[float]):
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"a table needs as many y as x values (got {len(xs)} x, {len(ys)} y)")
        if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
            raise ValueError(f"log-log table needs positive values, got x={xs} y={ys}")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError(f"table x values must increase strictly, got {xs}")
        self.xs, self.ys = list(xs), list(ys)
        self._lx = [math.log(x) for x in xs]
        self._ly = [math.log(y) for y in ys]

    def __call__(self, x: float) -> float:
        if len(self.xs) == 1:
            return self.ys[0]
        x = max(x, 1e-12)
        lx = math.log(x)
        i = _segment(self._lx, lx)
        x0, x1, y0, y1 = self._lx[i], self._lx[i + 1], self._ly[i], self._ly[i + 1]
        ly = y0 + (y1 - y0) * (lx - x0) / (x1 - x0)
        if lx < x0 and y1 < y0:  # never extrapolate a falling end segment upwards past the edge
            ly = y0
        return math.exp(ly)


class Table2D:
    """z(x, y): log-log in x (tokens or batch, > 0), linear in y (a context or prefix length ≥ 0).
    `z[j][i]` is the value at (xs[i], ys[j])."""

    def __init__(self, xs: list[float], ys: list[float], z: list[list[float]]):
        if len(z) != len(ys) or any(len(row) != len(xs) for row in z):
            raise ValueError(f"table shape {len(z)}×{[len(r) for r in z]} does not match {len(ys)} y × {len(xs)} x")
        if any(b <= a for a, b in zip(ys, ys[1:])):
            raise ValueError(f"table y values must increase strictly, got {ys}")
        self.xs, self.ys = list(xs), list(ys)
        self.rows = [Table1D(xs, row) for row in z]

    def __call__(self, x: float, y: float) -> float:
        if len(self.ys) == 1:
            return self.rows[0](x)
        j = _segment(self.ys, y)
        y0, y1 = self.ys[j], self.ys[j + 1]
        z0, z1 = self.rows[j](x), self.rows[j + 1](x)
        z = z0 + (z1 - z0) * (y - y0) / (y1 - y0)
        return max(z, 1e-9)
