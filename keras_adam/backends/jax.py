"""What runs on the JAX backend.

Every step is the `keras.ops` transcription of `keras_adam.update_rule`; on
JAX, XLA is the fused path. What `fused` means here:

- Under a tracer (`model.fit` with `jit_compile=True`, `jax.jit` of
  `optimizer.stateless_apply`, any `jax.jit` the step runs in) the step is
  traced into the caller's program and XLA compiles and fuses it, whatever
  `fused` says: with the default options it is the same program as
  `keras.optimizers.Adam`'s, and gives bit-identical weights.
- Eagerly (`optimizer.apply` or `apply_gradients` outside any tracer, and
  `model.fit` with `jit_compile=False` or `run_eagerly=True`), with
  `fused=None` (default) or `fused=True` the whole `apply` (unscaling,
  clipping, gradient accumulation, the update of every variable, weight
  averaging, the step counter, and the verdict of `skip_nonfinite`) runs as
  ONE jitted XLA program over the current values of the variables, whose
  results are then assigned. The program is compiled on the first eager
  step and cached per optimizer, variable list and hyperparameters (a new
  value of an attribute such as `beta_1` compiles a new one; a new learning
  rate, a variable, does not). It agrees with the `keras.ops` path to
  round-off (it is the program `jax.jit` compiles, which rounds a few
  operations differently from op-by-op dispatch) and is bit-identical to
  `keras.optimizers.Adam` under `jax.jit`.
  It pays (`python -m benchmarks.jax_backend`, on 2 CPU cores): the eager
  step of 200 small variables is some 20x faster than op by op, of one
  16.8M-parameter variable 4x, of 50 variables of 768x768 1.7x. It
  donates no buffer: an array read from a variable before the step stays
  valid, as with Keras's eager step (so the results go to fresh buffers,
  whose page faults are most of what remains of a large step's cost).
- Eagerly with `fused=False`: op-by-op `keras.ops`, as
  `keras.optimizers.Adam` runs eagerly, and bit-identical to it.
- The first step of an unbuilt optimizer (it creates the variables), and a
  plain callable learning rate (it may read state a trace would freeze)
  always run op-by-op.

`fused=True` is accepted with every option and dtype: XLA compiles them all.

To donate the state to a jitted `stateless_apply`, pass it in the order of
its results, the model's variables first: JAX pairs donated buffers with
results of the same shape in order, and `jax.jit(optimizer.stateless_apply,
donate_argnums=(0, 2))` pairs the first moment's buffer with the new
weights, and copies (for `keras.optimizers.Adam` as for this class).

Under `keras.distribution` the moments are created with their variable's
layout (`ModelParallel` shards them as it), and the eager compiled step
assigns its results back through each variable's layout.

`skip_nonfinite` selects between the new and the old values of every
variable instead of branching (`Engine.apply_skipping_nonfinite`): a
`jax.lax.cond` branch cannot assign variables.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import keras

from keras_adam.backends.engine import Engine

#: Types of the optimizer attributes that are baked into a compiled step.
_STATIC_TYPES = (bool, int, float, str, type(None), re.Pattern)

#: Compiled eager steps kept per optimizer (the oldest is dropped beyond).
_MAX_PROGRAMS = 16


def _traced(tree: Any) -> bool:
    """Whether any leaf of `tree` is a JAX tracer (the step is being traced)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def _stateless(step: Callable, state: list, variables: list | None) -> Callable:
    """`step(grads, variables)` as a pure function of the values of `state`.

    Args:
        step: Writes some of the variables of `state` (and reads them).
        state: Every variable `step` reads or writes.
        variables: The `trainable_variables` argument of `step`.

    Returns:
        `pure(values, grads)`: the new value of each variable of `state`,
        or None where `step` did not write it.
    """

    def pure(values: list, grads: list) -> list:
        mapping = list(zip(state, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            initial = dict(scope.state_mapping)
            step(grads, variables)
        new = [scope.get_current_value(variable) for variable in state]
        return [
            None if value is initial[id(variable)] else value
            for variable, value in zip(state, new, strict=True)
        ]

    return pure


class JaxEngine(Engine):
    """The JAX engine: `keras.ops` compiled by XLA, eagerly too (see the module docstring)."""

    def __init__(self, optimizer: Any) -> None:
        super().__init__(optimizer)
        # Compiled eager steps, by what their trace depends on (`_compiled_step`).
        self._compiled: dict[tuple, Callable] = {}

    def fused_flag_blockers(self) -> list[str]:
        """None: XLA compiles every option and dtype."""
        return []

    # -- the step ----------------------------------------------------------------

    def apply(self, apply: Callable, grads: list, trainable_variables: list | None) -> None:
        """One step; eagerly with `fused` not False, as one compiled program."""
        self._run("apply", apply, grads, trainable_variables)

    def apply_skipping_nonfinite(
        self, apply: Callable, grads: list, trainable_variables: list | None
    ) -> None:
        """The select-based skip of `Engine`; eagerly, as one compiled program."""

        def step(grads: list, trainable_variables: list | None) -> None:
            Engine.apply_skipping_nonfinite(self, apply, grads, trainable_variables)

        self._run("skip_nonfinite", step, grads, trainable_variables)

    def _run(
        self, kind: str, step: Callable, grads: list, trainable_variables: list | None
    ) -> None:
        """`step(grads, trainable_variables)`, compiled if it runs eagerly and may.

        Args:
            kind: What `step` does ("apply" or "skip_nonfinite"); part of the
                cache key of the compiled program.
            step: The step, writing the variables (Keras's `apply`, or it
                wrapped in the skip).
            grads: One gradient (or None) per variable.
            trainable_variables: The variables, or None for all of the
                optimizer's.
        """
        optimizer = self.optimizer
        grads = list(grads)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        if not self._may_compile():
            step(grads, trainable_variables)
            return
        state = [*optimizer._trainable_variables, *optimizer.variables]
        values = [variable.value for variable in state]
        if _traced(grads) or _traced(values):
            # Inside someone's trace: part of their program, fused by XLA.
            step(grads, trainable_variables)
            return
        compiled = self._compiled_step(kind, step, state, trainable_variables)
        for variable, value in zip(state, compiled(values, grads), strict=True):
            if value is not None:
                variable.assign(value)

    def _may_compile(self) -> bool:
        """Whether an eager step may run as one compiled program."""
        optimizer = self.optimizer
        if optimizer.fused is False or not optimizer.built:
            return False
        learning_rate = optimizer._learning_rate
        schedule = keras.optimizers.schedules.LearningRateSchedule
        return not (callable(learning_rate) and not isinstance(learning_rate, schedule))

    def _compiled_step(
        self, kind: str, step: Callable, state: list, variables: list | None
    ) -> Callable:
        """The jitted `_stateless` step, cached by everything its trace bakes in.

        That is: the kind of step, the variables (all the optimizer's, and
        those passed), the optimizer's plain attributes (hyperparameters
        such as `beta_1` or `clipnorm`) and `floatx`. Shapes, dtypes and
        which gradients are None are `jax.jit`'s own cache key.
        """
        optimizer = self.optimizer
        key = (
            kind,
            tuple(map(id, state)),
            None if variables is None else tuple(map(id, variables)),
            tuple((k, v) for k, v in vars(optimizer).items() if isinstance(v, _STATIC_TYPES)),
            keras.config.floatx(),
        )
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= _MAX_PROGRAMS:
                del self._compiled[next(iter(self._compiled))]
            compiled = jax.jit(_stateless(step, state, variables))
            self._compiled[key] = compiled
        return compiled
