"""The memory-bandwidth floor: Adam's access pattern in one pass.

It reads θ, g, m, v and writes θ, m, v, in C with OpenMP, compiled at run
time with the machine's C compiler. Without one, a NumPy version (several
passes) stands in and the report says so.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile

import numpy as np

SOURCE = r"""
#include <math.h>
void adam_pass(float *p, const float *g, float *m, float *v, long n,
               float b1, float b2, float step, float eps) {
  #pragma omp parallel for schedule(static)
  for (long i = 0; i < n; i++) {
    float gi = g[i];
    float mi = m[i] + (gi - m[i]) * (1.0f - b1);
    float vi = v[i] + (gi * gi - v[i]) * (1.0f - b2);
    m[i] = mi;
    v[i] = vi;
    p[i] -= step * mi / (sqrtf(vi) + eps);
  }
}
"""


def _compile() -> ctypes.CDLL | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    folder = tempfile.mkdtemp(prefix="adam_floor_")
    source, library = os.path.join(folder, "floor.c"), os.path.join(folder, "floor.so")
    with open(source, "w") as handle:
        handle.write(SOURCE)
    command = [compiler, "-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
    command.append(source)
    result = subprocess.run([*command, "-o", library, "-lm"], capture_output=True, check=False)
    if result.returncode != 0:
        return None
    lib = ctypes.CDLL(library)
    pointer = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    lib.adam_pass.argtypes = [pointer] * 4 + [ctypes.c_long] + [ctypes.c_float] * 4
    lib.adam_pass.restype = None
    return lib


class Floor:
    """One pass of Adam's memory traffic over `n` float32 parameters."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.p = rng.standard_normal(n, dtype="float32")
        self.g = rng.standard_normal(n, dtype="float32")
        self.m = np.zeros(n, "float32")
        self.v = np.zeros(n, "float32")
        self._lib = _compile()
        self.kind = "C kernel, one pass" if self._lib else "NumPy, several passes"

    def step(self) -> None:
        """Run the pass once."""
        if self._lib is not None:
            self._lib.adam_pass(self.p, self.g, self.m, self.v, self.p.size, 0.9, 0.999, 1e-3, 1e-7)
            return
        p, g, m, v = self.p, self.g, self.m, self.v
        m += (g - m) * 0.1
        v += (g * g - v) * 0.001
        p -= 1e-3 * m / (np.sqrt(v) + 1e-7)
