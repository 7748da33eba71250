"""The workloads: gradients are given, only the optimizer step is timed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    """A set of float32 variables, and for a sparse workload the rows touched.

    Attributes:
        name: Short name used in tables.
        description: What it models.
        shapes: One shape per variable.
        rows_touched: For the embedding workload, rows touched per step
            (the gradient is a `tf.IndexedSlices`); None for dense gradients.
    """

    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]
    rows_touched: int | None = None

    @property
    def parameters(self) -> int:
        """Total number of parameters."""
        return int(sum(np.prod(shape) for shape in self.shapes))

    @property
    def sparse(self) -> bool:
        """Whether gradients are sparse rows."""
        return self.rows_touched is not None


def workloads(quick: bool = False) -> list[Workload]:
    """The issue's workloads; `quick` scales each down about eightfold."""
    k = 8 if quick else 1
    return [
        Workload(
            "200 small",
            "200 small variables (a deep narrow network), 2.1M parameters",
            ((10_486 // k,),) * 200,
        ),
        Workload("1 large", "one variable of 16.8M parameters", ((16_777_216 // k,),)),
        Workload("50 medium", "50 variables of 768x768, 29.5M parameters", ((768 // k, 768),) * 50),
        Workload(
            "embedding",
            "a 1M x 64 embedding table, 1% of rows touched per step",
            ((1_000_000 // k, 64),),
            rows_touched=10_000 // k,
        ),
    ]


def gradients(workload: Workload, seed: int = 0) -> list[np.ndarray]:
    """Dense gradients, or for a sparse workload the touched rows' values."""
    rng = np.random.default_rng(seed)
    if workload.sparse:
        return [rng.standard_normal((workload.rows_touched, *workload.shapes[0][1:]), "float32")]
    return [rng.standard_normal(shape, dtype="float32") for shape in workload.shapes]


def touched_rows(workload: Workload, seed: int = 0) -> np.ndarray:
    """Distinct rows an embedding step touches."""
    rng = np.random.default_rng(seed + 1)
    return np.sort(rng.choice(workload.shapes[0][0], workload.rows_touched, replace=False))
