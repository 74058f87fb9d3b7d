"""Matching the features of two transcoder sets, per layer, by the cosine similarity of their decoder rows.

One-to-one, maximum total cosine: scipy.optimize.linear_sum_assignment when scipy is installed, else
our own Hungarian algorithm (`hungarian`, the shortest-augmenting-path O(n^3) method, vectorised over
columns) up to `hungarian_max` features per side; above that a greedy assignment (pairs taken in
decreasing cosine among each feature's `greedy_candidates` best, each feature used once), which is
approximate. Pairs below `min_cos` are left unmatched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from lnscope.analysis.transcoders.model import TranscoderSet

try:  # pragma: no cover - depends on the environment
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # scipy is not a dependency
    _scipy_lsa = None


# ------------------------------------------------------------------------------------ assignment
def hungarian(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment of a rectangular cost matrix: (rows, cols), sorted by row.

    Every row is assigned when rows <= cols (else every column). O(n^2 m) time, O(n m) memory.
    """
    cost = np.asarray(cost, dtype=np.float64)
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row (1-based) assigned to column j; column 0 is virtual
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.nonzero(p[1:])[0]
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def assign(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's linear_sum_assignment when available, else `hungarian` (same optimum)."""
    if _scipy_lsa is not None:
        r, c = _scipy_lsa(cost)
        return np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64)
    return hungarian(cost)


def _greedy_from_candidates(vals: torch.Tensor, cols: torch.Tensor,
                            n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of a one-to-one matching from candidates vals, cols [n, k]: pairs in decreasing value."""
    n, k = vals.shape
    rows = torch.arange(n)[:, None].expand(-1, k)
    order = torch.argsort(vals.flatten(), descending=True)
    used_r = torch.zeros(n, dtype=torch.bool)
    used_c = torch.zeros(n_cols, dtype=torch.bool)
    out_r, out_c, out_v = [], [], []
    flat_r, flat_c = rows.flatten()[order].tolist(), cols.flatten()[order].tolist()
    flat_v = vals.flatten()[order].tolist()
    for r, c, v in zip(flat_r, flat_c, flat_v):
        if not used_r[r] and not used_c[c]:
            used_r[r] = used_c[c] = True
            out_r.append(r)
            out_c.append(c)
            out_v.append(v)
    r = torch.tensor(out_r, dtype=torch.long)
    o = torch.argsort(r)
    return r[o], torch.tensor(out_c, dtype=torch.long)[o], torch.tensor(out_v, dtype=torch.float64)[o]


def greedy_assign(sim: torch.Tensor, candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate max-similarity matching: each row's `candidates` best columns, taken greedily."""
    vals, cols = sim.topk(min(candidates, sim.shape[1]), dim=1)
    r, c, _ = _greedy_from_candidates(vals, cols, sim.shape[1])
    return r, c


def greedy_assign_vectors(a: torch.Tensor, b: torch.Tensor, candidates: int = 8, chunk: int = 2048):
    """`greedy_assign` on the cosines of the rows of a and b, without the full similarity matrix."""
    a = a.detach().float()
    b = b.detach().float()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(candidates, b.shape[0])
    vals, cols = [], []
    for s in range(0, a.shape[0], chunk):
        v, c = (a[s:s + chunk] @ b.T).topk(k, dim=1)
        vals.append(v.cpu())
        cols.append(c.cpu())
    return _greedy_from_candidates(torch.cat(vals), torch.cat(cols), b.shape[0])


@dataclass
class FeatureMatching:
    """Per layer: a_to_b[f] = matched feature of B (-1: none), cos[f] its decoder cosine."""

    a_to_b: dict[int, torch.Tensor]
    b_to_a: dict[int, torch.Tensor]
    cos: dict[int, torch.Tensor]
    method: dict[int, str]

    def match(self, layer: int, feature: int) -> int:
        t = self.a_to_b.get(layer)
        return -1 if t is None or feature >= t.numel() else int(t[feature])

    def summary(self) -> list[dict]:
        out = []
        for l, a2b in self.a_to_b.items():
            m = a2b >= 0
            c = self.cos[l][m]
            out.append({"layer": l, "matched": int(m.sum()), "n_a": int(a2b.numel()),
                        "n_b": int(self.b_to_a[l].numel()),
                        "mean_cos": float(c.mean()) if c.numel() else None, "method": self.method[l]})
        return out


def decoder_cosines(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    a = W_a.detach().double()
    b = W_b.detach().double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).cpu()


def match_features(tset_a: TranscoderSet, tset_b: TranscoderSet, *,
                   method: Literal["auto", "optimal", "greedy"] = "auto", hungarian_max: int = 4096,
                   greedy_candidates: int = 8, min_cos: float | None = None) -> FeatureMatching:
    """One-to-one decoder-cosine matching of the two sets' features, per shared layer."""
    a_to_b, b_to_a, cos, used = {}, {}, {}, {}
    for layer in sorted(set(tset_a.layers) & set(tset_b.layers)):
        W_a, W_b = tset_a[layer].W_dec, tset_b[layer].W_dec
        n_a, n_b = W_a.shape[0], W_b.shape[0]
        how = method
        if how == "auto":
            how = "optimal" if max(n_a, n_b) <= hungarian_max else "greedy"
        if how == "optimal":
            sim = decoder_cosines(W_a, W_b)
            r, c = assign(-sim.numpy())
            r, c = torch.from_numpy(r), torch.from_numpy(c)
            s = sim[r, c]
            name = "scipy" if _scipy_lsa is not None else "hungarian"
        else:
            r, c, s = greedy_assign_vectors(W_a, W_b, greedy_candidates)
            name = "greedy"
        if min_cos is not None:
            keep = s >= min_cos
            r, c, s = r[keep], c[keep], s[keep]
        ab = torch.full((n_a,), -1, dtype=torch.long)
        ba = torch.full((n_b,), -1, dtype=torch.long)
        cs = torch.full((n_a,), float("nan"), dtype=torch.float64)
        ab[r], ba[c], cs[r] = c, r, s
        a_to_b[layer], b_to_a[layer], cos[layer], used[layer] = ab, ba, cs, name
    return FeatureMatching(a_to_b, b_to_a, cos, used)


