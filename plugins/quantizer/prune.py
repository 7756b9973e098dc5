"""Selective ±1 pruning (PR #1019, PR #1392): zero the fewest, cheapest ±1 entries of an int-quantized artifact
until the whole artifact (code + compressed model) meets a byte target. Not a technique of its own: GPTQ's
``fit`` uses it.

Candidates are the entries with |q| = 1 of per-row-scaled tensors whose meta type is ``int6`` (``kinds =
"int6"``, #1019) or any ``int*`` (``"int"``, #1392, incl. the int8 embeddings), in meta order then
row-major, stably sorted by ``scale_row²`` (the references' list sort). ``fit_to_target`` binary-searches the
smallest prefix of that order that makes the artifact fit, each probe measuring the whole artifact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dataclasses
import torch
from torch import Tensor


@dataclasses.dataclass
class PruneCandidates:
    """The ±1 entries of the prunable tensors, cheapest first: tensor key, flat index and cost ``scale_row²``."""

    keys: list[str]
    tensor: Tensor
    flat: Tensor
    cost: Tensor

    def __len__(self) -> int:
        return int(self.flat.numel())


def prune_candidates(w: dict[str, Tensor], m: dict[str, Any], kinds: str) -> PruneCandidates:
    """Entries with |q| = 1 of per-row-scaled tensors whose meta type is ``int6`` (``kinds = "int6"``) or any
    ``int*`` (``"int"``), in meta order then row-major, stably sorted by ``scale_row²`` (the references' list
    sort)."""
    keys, tids, flats, costs = [], [], [], []
    for name, info in m.items():
        kind = info.get("type", "") if isinstance(info, dict) else ""
        if not (kind == "int6" if kinds == "int6" else kind.startswith("int")):
            continue
        qk, sk = name + ".q", name + ".scale"
        if qk not in w or sk not in w or w[sk].ndim == 0:
            continue
        q, s = w[qk], w[sk]
        flat = torch.nonzero(q.reshape(-1).abs() == 1).squeeze(1)
        if flat.numel() == 0:
            continue
        row = flat // (q.numel() // q.shape[0])
        tids.append(torch.full_like(flat, len(keys)))
        keys.append(qk)
        flats.append(flat)
        costs.append(s.float()[row].pow(2))
    if not keys:
        empty = torch.empty(0, dtype=torch.long)
        return PruneCandidates([], empty, empty, torch.empty(0))
    cost = torch.cat(costs)
    order = torch.sort(cost, stable=True).indices
    return PruneCandidates(keys, torch.cat(tids)[order], torch.cat(flats)[order], cost[order])


def apply_prune(w: dict[str, Tensor], cands: PruneCandidates, n: int) -> dict[str, Tensor]:
    """A copy of ``w`` with the ``n`` cheapest candidates zeroed (only the touched tensors are cloned)."""
    out = dict(w)
    n = min(n, len(cands))
    if n <= 0:
        return out
    tid, flat = cands.tensor[:n], cands.flat[:n]
    for t in torch.unique(tid).tolist():
        key = cands.keys[t]
        q = w[key].clone()
        q.view(-1)[flat[tid == t]] = 0
        out[key] = q
    return out


def fit_to_target(
    obj: dict, measure: Callable[[dict], int], kinds: str, target: int, unit: int, target_label: str, log: Callable[..., None]
) -> tuple[dict, dict[str, Any]]:
    """Zero the fewest cheapest candidates so that ``measure(obj) <= target`` (bytes); logs the references'
    ``selective_prune:`` lines (sizes in ``unit`` bytes, the target as ``target_label``). Returns the pruned
    object (``obj`` itself when nothing is pruned) and a report."""
    cands = prune_candidates(obj["w"], obj["m"], kinds)
    total = len(cands)
    if total == 0:
        return obj, {}

    def pruned(n: int) -> dict:
        return {**obj, "w": apply_prune(obj["w"], cands, n)}

    unpruned = measure(obj)
    report = {"candidates": total, "target_bytes": target, "unpruned_bytes": unpruned, "pruned": 0}
    log(f"selective_prune: {total} ±1 candidates, unpruned={unpruned / unit:.2f}MB target={target_label}MB")
    if unpruned <= target:
        log("selective_prune: already fits, no pruning needed")
        return obj, report
    full = pruned(total)
    full_size = measure(full)
    log(f"selective_prune: full ±1 prune={full_size / unit:.2f}MB")
    if full_size > target:
        log("selective_prune: even full prune not enough, applying all")
        report["pruned"] = total
        return full, report
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(pruned(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    log(f"selective_prune: pruning {lo}/{total} ±1 values ({100 * lo / total:.1f}%) to fit {target_label}MB")
    report["pruned"] = lo
    return pruned(lo), report
