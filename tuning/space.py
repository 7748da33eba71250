"""The search space of Adam's hyperparameters, and which of them a budget can afford.

Each hyperparameter is either a range `(low, high)`, searched on a log
scale, or a number, held fixed:

| name | searched as | default range |
|---|---|---|
| `learning_rate` (η) | log η | [1e-5, 1e-1] |
| `beta_1` (β1) | log (1 − β1) | 1 − β1 ∈ [0.01, 0.5], so β1 ∈ [0.5, 0.99] |
| `beta_2` (β2) | log (1 − β2) | 1 − β2 ∈ [1e-4, 1e-1], so β2 ∈ [0.9, 0.9999] |
| `epsilon` (ε̂) | log ε̂ | [1e-10, 1e-3] |
| `weight_decay` | log λ | none: not searched unless given a range |

β is searched through 1 − β because that is the quantity that matters:
1/(1 − β) is the averaging horizon of the moment, so β2 = 0.999 and 0.9999
(horizons 1 000 and 10 000 steps) are as far apart as 0.9 and 0.99. A uniform
draw of β2 in [0.9, 0.9999] would put 99.9% of the trials below 0.9999's
neighbourhood.

Which ranges are searched follows the trial budget, as the Google Deep
Learning Tuning Playbook advises (tune what matters most first): with fewer
than 10 trials only η; with 10 to 24, η and β1; with 25 or more, every
parameter that has a range (η, β1, β2, ε, and weight decay when given a
range). The others stay at Keras's defaults (η = 1e-3, β1 = 0.9, β2 = 0.999,
ε̂ = 1e-7, no weight decay), or at the number given. `tuned=` overrides the
rule.

Example:
    >>> from tuning import AdamSearchSpace
    >>> space = AdamSearchSpace(learning_rate=(1e-4, 1e-2), beta_2=0.99)
    >>> space.tuned_names(max_trials=12)
    ('learning_rate', 'beta_1')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

#: Hyperparameters the space knows, in the order a budget adds them.
NAMES = ("learning_rate", "beta_1", "beta_2", "epsilon", "weight_decay")

#: Values used when a hyperparameter is not searched and no number is given.
DEFAULTS = {
    "learning_rate": 1e-3,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
    "weight_decay": None,
}

#: Where a search starts (GridSearch's first point, the prior's centre).
_STARTS = {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

#: The default budget of `tuning.search` and `keras-adam-tune`: trials, and epochs per trial.
DEFAULT_MAX_TRIALS = 20
DEFAULT_EPOCHS = 15

#: Trial budgets at which `tuned_names` adds parameters.
BUDGET_STEPS = ((10, 2), (25, len(NAMES)))

Value = float | tuple[float, float] | None


def _is_beta(name: str) -> bool:
    return name in ("beta_1", "beta_2")


def hp_name(name: str) -> str:
    """The KerasTuner hyperparameter that carries `name` (β as 1 − β)."""
    return f"one_minus_{name}" if _is_beta(name) else name


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"Argument `{name}` must be a number or a (low, high) pair. "
            f"Received: {name}={value!r} (of type {type(value).__name__})"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Argument `{name}` must be finite. Received: {name}={value!r}")
    if _is_beta(name):
        if not 0 <= value < 1:
            raise ValueError(f"Argument `{name}` must be in [0, 1). Received: {name}={value!r}")
    elif name == "learning_rate":
        if value <= 0:
            raise ValueError(f"Argument `{name}` must be positive. Received: {name}={value!r}")
    elif value < 0:
        raise ValueError(f"Argument `{name}` must be non-negative. Received: {name}={value!r}")
    return value


def _check_range(name: str, value: Sequence) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(
            f"Argument `{name}` must be a number or a (low, high) pair. Received: {name}={value!r}"
        )
    low, high = (_check_number(name, v) for v in value)
    if not low < high:
        raise ValueError(
            f"Argument `{name}` must be a range with low < high. Received: {name}={tuple(value)!r}"
        )
    if low <= 0:
        raise ValueError(
            f"Argument `{name}` is searched on a log scale, so its low end must be "
            f"positive. Received: {name}={tuple(value)!r}"
        )
    return low, high


@dataclass(frozen=True)
class AdamSearchSpace:
    """Ranges (searched) or numbers (fixed) for each of Adam's hyperparameters.

    Attributes:
        learning_rate: η: a `(low, high)` range or a number.
        beta_1: β1: a range of β1 values (searched as log(1 − β1)) or a number.
        beta_2: β2: a range of β2 values (searched as log(1 − β2)) or a number.
        epsilon: ε̂ (Keras's placement, see `keras_adam.Adam`): a range or a
            number.
        weight_decay: a range, a number, or None for no weight decay.
        tuned: Names to search, overriding the budget rule; each must have a
            range. None lets `tuned_names` choose by budget.
    """

    learning_rate: Value = (1e-5, 1e-1)
    beta_1: Value = (0.5, 0.99)
    beta_2: Value = (0.9, 0.9999)
    epsilon: Value = (1e-10, 1e-3)
    weight_decay: Value = None
    tuned: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Validate every field; ranges become float pairs, numbers floats."""
        for name in NAMES:
            value = getattr(self, name)
            if value is None:
                if name != "weight_decay":
                    raise ValueError(
                        f"Argument `{name}` must be a number or a (low, high) pair. "
                        f"Received: {name}=None"
                    )
                continue
            if isinstance(value, Sequence) and not isinstance(value, str):
                checked: Any = _check_range(name, value)
            else:
                checked = _check_number(name, value)
            object.__setattr__(self, name, checked)
        if self.tuned is not None:
            if isinstance(self.tuned, str):
                raise TypeError(
                    "Argument `tuned` must be a sequence of names, not a string. "
                    f"Received: tuned={self.tuned!r}"
                )
            tuned = tuple(self.tuned)
            for name in tuned:
                if name not in NAMES:
                    raise ValueError(
                        f"Argument `tuned` may only name {', '.join(NAMES)}. "
                        f"Received: tuned={tuned!r}"
                    )
                if name not in self.ranged_names:
                    raise ValueError(
                        f"Argument `tuned` names {name!r}, which has no range to search: "
                        f"pass {name}=(low, high). Received: {name}={getattr(self, name)!r}"
                    )
            if len(set(tuned)) != len(tuned) or not tuned:
                raise ValueError(
                    "Argument `tuned` must name at least one parameter, each once. "
                    f"Received: tuned={tuned!r}"
                )
            object.__setattr__(self, "tuned", tuned)

    @property
    def ranged_names(self) -> tuple[str, ...]:
        """The names given a `(low, high)` range, in budget order."""
        return tuple(n for n in NAMES if isinstance(getattr(self, n), tuple))

    def tuned_names(self, max_trials: int | None = None) -> tuple[str, ...]:
        """Which hyperparameters to search with a budget of `max_trials`.

        Args:
            max_trials: The trial budget; None means unbounded.

        Returns:
            `tuned` if it was given, else the first 1, 2 or all of
            `ranged_names` for budgets under 10, under 25, or larger.
        """
        if self.tuned is not None:
            return self.tuned
        ranged = self.ranged_names
        count = len(ranged) if max_trials is None else 1
        for budget, n in BUDGET_STEPS:
            if max_trials is not None and max_trials >= budget:
                count = n
        return ranged[:count]

    def for_budget(self, max_trials: int | None) -> AdamSearchSpace:
        """A copy with `tuned` fixed to `tuned_names(max_trials)`."""
        return replace(self, tuned=self.tuned_names(max_trials))

    def fixed(self, **values: float | None) -> AdamSearchSpace:
        """A copy with some hyperparameters held at the given numbers."""
        for name in values:
            if name not in NAMES:
                raise ValueError(
                    f"Unknown hyperparameter {name!r}; the space holds {', '.join(NAMES)}."
                )
        tuned = self.tuned and tuple(n for n in self.tuned if n not in values)
        return replace(self, **values, tuned=tuned or None)

    def fixed_value(self, name: str) -> float | None:
        """The value of `name` when it is not searched."""
        value = getattr(self, name)
        return DEFAULTS[name] if isinstance(value, tuple) else value

    def declare(self, hp: Any) -> dict:
        """Declare the searched hyperparameters on a KerasTuner `hp` and sample them.

        Args:
            hp: A `keras_tuner.HyperParameters`.

        Returns:
            `keras_adam.Adam` keyword arguments for the five hyperparameters,
            searched or fixed.
        """
        tuned = self.tuned_names()
        values = {}
        for name in NAMES:
            if name not in tuned:
                values[name] = self.fixed_value(name)
                continue
            low, high = getattr(self, name)
            if _is_beta(name):
                low, high = 1.0 - high, 1.0 - low
            start = _STARTS.get(name)
            start = 1.0 - start if _is_beta(name) and start is not None else start
            if start is None or not low <= start <= high:
                start = math.sqrt(low * high)
            sampled = hp.Float(hp_name(name), low, high, sampling="log", default=start)
            values[name] = 1.0 - sampled if _is_beta(name) else sampled
        return values

    def to_json(self) -> dict:
        """The space as JSON-ready values (ranges as lists), for fingerprints and files."""
        values = {
            n: list(v) if isinstance(v, tuple) else v for n in NAMES for v in [getattr(self, n)]
        }
        return {**values, "tuned": list(self.tuned_names())}

    def values_from(self, hp_values: Mapping[str, Any]) -> dict:
        """`keras_adam.Adam` arguments from a trial's `hp.values`."""
        values = {}
        for name in NAMES:
            key = hp_name(name)
            if key in hp_values and name in self.tuned_names():
                value = float(hp_values[key])
                values[name] = 1.0 - value if _is_beta(name) else value
            else:
                values[name] = self.fixed_value(name)
        return values
