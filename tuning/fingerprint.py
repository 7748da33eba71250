"""What defines a search, recorded in its directory so that only the same search resumes.

A search directory holds `fingerprint.json`: one short hash per part of
the search (the model's config, the data's shapes, dtypes and contents,
the objective, the space, the loss and metrics, the fixed options, the
epochs, the batch size, the tuner, the seed). `check` compares a new
search with it: a rerun of the same search resumes; any other refuses with
one line that names the parts that changed. The trial budget is not part
of it: a larger `max_trials` adds trials to the same search.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from tuning.output import atomic_open

FILE = "fingerprint.json"


def _numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype") and not hasattr(value, "element_spec"):
        import keras

        try:
            return np.asarray(keras.ops.convert_to_numpy(value))
        except Exception:  # noqa: BLE001 - not convertible: described by type only
            return None
    return None


def describe_data(value: Any) -> Any:
    """A JSON-ready description of data: shapes, dtypes and a SHA-256 of the contents.

    Arrays and tensors are hashed; lists, tuples and dicts are described
    element by element; a dataset or generator, which cannot be read twice,
    by its type and element spec only.
    """
    if value is None or isinstance(value, bool | int | float | str):
        return value
    array = _numpy(value)
    if array is not None:
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
        return {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": digest}
    if isinstance(value, Mapping):
        return {
            str(k): describe_data(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, int | float) for v in value):
            return describe_data(np.asarray(value))
        return [describe_data(v) for v in value]
    return {"type": type(value).__name__, "spec": str(getattr(value, "element_spec", ""))}


def _without_counters(value: Any) -> Any:
    """Drop Keras's per-session name counters ("dense_3" -> "dense") from a config."""
    if isinstance(value, str):
        return re.sub(r"_\d+$", "", value)
    if isinstance(value, Mapping):
        return {k: _without_counters(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_counters(v) for v in value]
    return value


def model_config(model: Any) -> Any:
    """The model's config without name counters, or its class name if it has none."""
    try:
        return _without_counters(model.get_config())
    except (NotImplementedError, TypeError, AttributeError):
        return {"class": type(model).__name__, "weights": [list(w.shape) for w in model.weights]}


def _hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(parts: Mapping[str, Any]) -> dict[str, str]:
    """One hash per part (name → JSON-ready value), plus "search", the hash of them all."""
    hashes = {name: _hash(value) for name, value in parts.items()}
    return {**hashes, "search": _hash(hashes)}


class SearchMismatchError(ValueError):
    """The project directory holds another search; the message names what changed."""


def check(project_dir: str, hashes: Mapping[str, str], *, overwrite: bool) -> None:
    """Refuse to resume a different search in `project_dir`.

    Args:
        project_dir: The search's directory.
        hashes: `fingerprint(...)` of the new search.
        overwrite: The search starts afresh: nothing to check.

    Raises:
        SearchMismatchError: if the directory holds a search with another
            fingerprint, or one written without a fingerprint.
    """
    if overwrite or not os.path.exists(os.path.join(project_dir, "oracle.json")):
        return
    try:
        with open(os.path.join(project_dir, FILE)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = None
    if stored is None:
        changed = "it has no fingerprint (an older or foreign search)"
    else:
        names = [n for n in hashes if n != "search" and stored.get(n) != hashes[n]]
        if not names:
            return
        changed = "changed: " + ", ".join(names)
    raise SearchMismatchError(
        f"Argument `project`: {project_dir} holds a different search ({changed}). Pass "
        "overwrite=True (--overwrite) to start afresh, or choose another project (--project)."
    )


def write(project_dir: str, hashes: Mapping[str, str]) -> None:
    """Record the search's fingerprint in its directory."""
    os.makedirs(project_dir, exist_ok=True)
    with atomic_open(os.path.join(project_dir, FILE)) as f:
        json.dump(dict(hashes), f, indent=2, sort_keys=True)
        f.write("\n")
