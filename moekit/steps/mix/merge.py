"""How ``mix`` merges the tensors the branches share (attention, norms, embeddings): fp32, chunk by chunk.

``mean`` is the weighted mean of the branches (BTX). The others work on the branches' deltas
from the seed, ``d_i = branch_i - seed``, and write ``seed + scale * merged``:

- ``task-arithmetic`` (Ilharco et al. 2023): ``merged = sum_i w_i d_i`` with the averaging
  weights (which sum to 1), so ``scale`` 1 is the mean and ``scale`` N the sum of the deltas;
- ``ties`` (Yadav et al. 2023, TIES-Merging): each delta keeps only its largest-magnitude
  ``density`` share of values (trim), each value's sign is elected from the weighted sum of the
  trimmed deltas, and the deltas that agree with it are averaged (disjoint mean);
- ``dare`` (Yu et al. 2024): each delta value is dropped with probability ``1 - density`` and
  the survivors scaled by ``1 / density`` (unbiased), then the weighted sum.

Trimming thresholds are taken per chunk of about 4M values: a whole tensor for every tensor but
the largest embeddings, whose chunks are large random samples of them. DARE's draws are seeded
by (random seed, tensor name, chunk, branch), so a mix is reproducible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

MERGE_METHODS = ("mean", "task-arithmetic", "ties", "dare")


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its knobs."""

    method: str = "mean"
    density: float = 1.0  # ties, dare: share of each delta kept
    scale: float = 1.0  # task-arithmetic, ties, dare: multiplies the merged delta
    random_seed: int = 0  # dare's drops

    @property
    def uses_seed(self) -> bool:
        """Whether the merge needs the seed's tensor (all but the plain mean)."""
        return self.method != "mean"


def _draw_seed(random_seed: int, name: str, chunk: int, branch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{random_seed}/{name}/{chunk}/{branch}".encode()).digest()[:8], "little")


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
    """``delta`` with all but its largest-magnitude ``density`` share of values set to 0."""
    if density >= 1.0:
        return delta
    keep = max(1, int(round(density * delta.size)))
    magnitude = np.abs(delta).reshape(-1)
    threshold = np.partition(magnitude, delta.size - keep)[delta.size - keep]
    return np.where(np.abs(delta) >= threshold, delta, np.float32(0))


def merge_chunk(
    seed: np.ndarray, branches: list[np.ndarray], weights: list[float], spec: MergeSpec, name: str, chunk: int
) -> np.ndarray:
    """The merged fp32 values of one chunk (``seed`` and ``branches`` are fp32 arrays of one shape)."""
    deltas = [branch - seed for branch in branches]
    w = [np.float32(x) for x in weights]
    if spec.method == "task-arithmetic":
        merged = sum(wi * d for wi, d in zip(w, deltas))
    elif spec.method == "dare":
        merged = np.zeros_like(seed)
        for index, (wi, delta) in enumerate(zip(w, deltas)):
            rng = np.random.default_rng(_draw_seed(spec.random_seed, name, chunk, index))
            kept = rng.random(delta.shape, dtype=np.float32) < spec.density
            merged += wi * np.where(kept, delta / np.float32(spec.density), np.float32(0))
    elif spec.method == "ties":
        trimmed = [_trim(d, spec.density) for d in deltas]
        elected = np.sign(sum(wi * t for wi, t in zip(w, trimmed)))
        numerator, denominator = np.zeros_like(seed), np.zeros_like(seed)
        for wi, t in zip(w, trimmed):
            agrees = (np.sign(t) == elected) & (t != 0)
            numerator += np.where(agrees, wi * t, np.float32(0))
            denominator += np.where(agrees, wi, np.float32(0))
        merged = np.divide(numerator, denominator, out=np.zeros_like(seed), where=denominator > 0)
    else:
        raise ValueError(f"unknown merge method {spec.method}")
    return (seed + np.float32(spec.scale) * merged).astype(np.float32, copy=False)
