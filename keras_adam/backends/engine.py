"""What every backend's engine shares, and the generic `keras.ops` engine.

An engine executes the steps of one `keras_adam.Adam`: which path a
variable's update takes (the `keras.ops` transcription of
`keras_adam.update_rule`, or a backend's fused kernel), how the variables of
one step are grouped, and how a step is skipped when a gradient is not
finite. The optimizer (`keras_adam.adam`) calls it at four points:
construction (`fused_flag_blockers`), `build` (`check_build`), `apply`
(`apply`, or `apply_skipping_nonfinite`) and the step itself (`update_all`, then
`update_variable` for each variable that `update_all` did not take).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import keras
from keras import ops


class Engine:
    """The generic engine: every variable through `keras.ops`, no kernels.

    Backends subclass it and override what they run differently.

    Attributes:
        optimizer: The `keras_adam.Adam` this engine runs.
        sparse_gradients: Whether this backend's layers produce sparse
            gradients (`lazy_sparse` has rows to be lazy about).
    """

    sparse_gradients = False

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    @property
    def backend(self) -> str:
        """The Keras backend's name."""
        return keras.backend.backend()

    # -- which path ------------------------------------------------------------

    def fused_flag_blockers(self) -> list[str]:
        """Why the optimizer's options rule out the fused path (empty if none)."""
        return [f"the {self.backend} backend (it has no fused Adam kernel)"]

    def fused_dtype_blocker(self, variable: Any) -> str | None:
        """Why `variable` cannot take the fused path (None if it can)."""
        return None

    def fused_applies(self, variable: Any) -> bool:
        """Whether `variable`'s update takes the fused path (options and dtypes)."""
        if self.optimizer.fused is False or self.fused_flag_blockers():
            return False
        return self.fused_dtype_blocker(variable) is None

    # -- build -----------------------------------------------------------------

    def check_build(self, var_list: list) -> None:
        """Checks before the optimizer creates its variables for `var_list`.

        Raises:
            ValueError: with `fused=True`, if a variable cannot take the
                fused path.
        """
        optimizer = self.optimizer
        if optimizer.fused:
            for variable in var_list:
                blocker = self.fused_dtype_blocker(variable)
                if blocker:
                    raise ValueError(
                        f"Argument `fused=True` cannot apply to variable "
                        f"'{getattr(variable, 'path', variable.name)}': {blocker}."
                    )
        if optimizer.lazy_sparse and not self.sparse_gradients:
            warnings.warn(
                f"keras_adam.Adam(lazy_sparse=True) on the {self.backend} backend: its "
                "gradients are always dense (Embedding layers included), so every step "
                "updates every row, exactly as with lazy_sparse=False. The option is "
                "kept so that a configuration saved on TensorFlow loads here.",
                UserWarning,
                stacklevel=4,
            )

    def restore_scope(self) -> contextlib.AbstractContextManager:
        """Where `build` restores state loaded before it (eagerly, outside traces)."""
        return contextlib.nullcontext()

    # -- gradients -------------------------------------------------------------

    def is_sparse(self, gradient: Any) -> bool:
        """Whether `gradient` is a sparse (row-slices) gradient."""
        return False

    def count_nonfinite(self, grads: list) -> Any:
        """How many of `grads` hold a NaN or an infinity (a float32 scalar).

        None entries are ignored; a sparse gradient is judged by its values.
        """
        counts = []
        for gradient in grads:
            if gradient is None:
                continue
            values = gradient.values if self.is_sparse(gradient) else gradient
            counts.append(ops.cast(ops.logical_not(ops.all(ops.isfinite(values))), "float32"))
        return ops.sum(ops.stack(counts)) if counts else ops.zeros((), "float32")

    # -- the step --------------------------------------------------------------

    def apply(self, apply: Callable, grads: list, trainable_variables: list | None) -> None:
        """One step: `apply(grads, trainable_variables)`, Keras's `Optimizer.apply`."""
        apply(grads, trainable_variables)

    def apply_skipping_nonfinite(
        self, apply: Callable, grads: list, trainable_variables: list | None
    ) -> None:
        """`apply(grads, trainable_variables)`, or nothing but a count if a gradient is not finite.

        Without control flow over state: the step runs, then every variable
        it may have written (the model's trainable variables and the
        optimizer's own: moments, `iterations`, accumulators, averages)
        takes its new value if every gradient was finite, its old value
        otherwise. This compiles under any tracer (`jax.jit`, XLA) and
        needs no branch that assigns variables.
        """
        optimizer = self.optimizer
        finite = ops.equal(self.count_nonfinite(grads), 0)
        counter = optimizer.skipped_steps
        state = [*optimizer._trainable_variables]
        state += [v for v in optimizer.variables if v is not counter]
        before = [v.value for v in state]
        apply(grads, trainable_variables)
        for variable, old in zip(state, before, strict=True):
            variable.assign(ops.where(finite, variable.value, old))
        counter.assign_add(ops.cast(ops.logical_not(finite), counter.dtype))

    def update_all(
        self, grads: list, variables: list, learning_rate: Any, update_each: Callable
    ) -> None:
        """One step of all `variables`; `update_each` is Keras's per-variable loop."""
        update_each(grads, variables, learning_rate)

    def update_variable(self, gradient: Any, variable: Any, slots: list, hyper: dict) -> None:
        """One step of one variable (the generic engine: the `keras.ops` path)."""
        self.optimizer._reference_update(gradient, variable, slots, hyper)
