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
  It pays most for many small variables, where op-by-op dispatch costs
  more than the arithmetic (`python -m benchmarks.jax_backend` measures
  it). It donates no buffer: an array read from a variable before the step
  stays valid, as with Keras's eager step.
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

Sparse gradients (`jax.experimental.sparse.BCOO`, which Keras's optimizers
accept) take the reference path, whose `keras.ops` combine them with the
dense moments as Keras does.

Quantized moments (`moment_dtype="int8"` or `"int4"`) of float32 variables
step in the C++ kernel as an XLA custom call (`kernels.quantized_xla`),
traced like the rest: one call per step and set of hyperparameters for
up to 32 such variables (`quantized_xla.VARIABLES_PER_CALL`), its results
in its inputs' buffers. Under
`keras.distribution` (the call has no sharding rule), with `fused=False`
and with RAdam they take the reference path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import keras
from jax.experimental import sparse as jax_sparse

from keras_adam.backends.engine import (
    Engine,
    KerasApply,
    ScalarsCache,
    Update,
    quantized_kernel_flags,
    quantized_kernel_scalars,
)
from keras_adam.kernels import quantized_xla
from keras_adam.quantization import QuantizedMoment

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

    def __init__(self) -> None:
        # Compiled eager steps, by what their trace depends on (`_run`).
        self._compiled: dict[tuple, Callable] = {}

    def fused_blockers(self, options: Any) -> list[str]:
        """None: XLA compiles every option and dtype."""
        return []

    def stored_values(self, gradient: Any) -> Any:
        """A `BCOO` gradient's stored values, else the gradient itself."""
        return gradient.data if isinstance(gradient, jax_sparse.BCOO) else gradient

    # -- quantized moments ------------------------------------------------------

    def update(self, update: Update) -> None:
        """One step: quantized moments in XLA custom calls, the rest on `Engine`'s path.

        The variables with quantized moments go to one custom call per set
        of hyperparameters and 32 variables (their blocks split over
        threads); the others each take `update_one`.
        """
        scalars = ScalarsCache(update)
        groups: dict[Any, list] = {}
        for grad, variable in zip(update.grads, update.variables, strict=True):
            if grad is None:
                continue
            slots = update.slots(variable)
            if self._quantized_kernel(grad, variable, slots, update):
                groups.setdefault(update.hyper(variable), []).append((variable, grad, slots))
            else:
                self.update_one(grad, variable, update, scalars)
        for hyper, members in groups.items():
            variables, grads, slots = zip(*members, strict=True)
            stepped = quantized_xla.step(
                [variable.value for variable in variables],
                list(grads),
                [list(s) for s in slots],  # m, v and with AMSGrad v̂
                quantized_kernel_scalars(scalars("float32", hyper)),
                quantized_kernel_flags(hyper),
            )
            for variable, moments, (value, stored) in zip(variables, slots, stepped, strict=True):
                variable.assign(value)
                for moment, new in zip(moments, stored, strict=True):
                    moment.variable.assign(new)

    def _quantized_kernel(self, grad: Any, variable: Any, slots: list, update: Update) -> bool:
        """Whether `variable`, with moments `slots`, takes the quantized custom call.

        That is: quantized moments, float32, a dense gradient, not
        `fused=False` nor RAdam, no `keras.distribution` (the call has no
        sharding rule), and the kernel built.
        """
        options = update.options
        return (
            bool(slots)
            and isinstance(slots[0], QuantizedMoment)
            and options.fused is not False
            and not options.hyper.rectify
            and keras.backend.standardize_dtype(variable.dtype) == "float32"
            and not isinstance(grad, jax_sparse.BCOO)
            and keras.distribution.distribution() is None
            and quantized_xla.available()
        )

    # -- around Keras's apply ----------------------------------------------------

    def apply(self, step: KerasApply) -> None:
        """One step; eagerly, where it may, as one compiled program."""
        self._run("apply", step.run, step)

    def apply_skipping_nonfinite(self, step: KerasApply, counter: Any) -> None:
        """The select-based skip of `Engine`; eagerly, as one compiled program."""

        def skipping(grads: list, trainable_variables: list | None) -> None:
            inner = dataclasses.replace(step, grads=grads, trainable_variables=trainable_variables)
            Engine.apply_skipping_nonfinite(self, inner, counter)

        full = dataclasses.replace(step, state=lambda: [*step.state(), counter])
        self._run("skip_nonfinite", skipping, full)

    def _run(self, kind: str, run: Callable, step: KerasApply) -> None:
        """`run(step.grads, step.trainable_variables)`, compiled if it runs eagerly and may.

        Args:
            kind: What `run` does; part of the cache key of the program.
            run: The step, writing the variables of `step.state()`.
            step: The call of Keras's `apply` (its gradients, variables,
                state and trace key).
        """
        grads, trainable_variables = step.grads, step.trainable_variables
        key = step.trace_key()
        if key is None:
            run(grads, trainable_variables)
            return
        variables = step.state()
        values = [variable.value for variable in variables]
        if _traced(grads) or _traced(values):
            # Inside someone's trace: part of their program, fused by XLA.
            run(grads, trainable_variables)
            return
        key = (
            kind,
            key,
            tuple(map(id, variables)),
            None if trainable_variables is None else tuple(map(id, trainable_variables)),
        )
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= _MAX_PROGRAMS:
                del self._compiled[next(iter(self._compiled))]
            compiled = jax.jit(_stateless(run, variables, trainable_variables))
            self._compiled[key] = compiled
        for variable, value in zip(variables, compiled(values, grads), strict=True):
            if value is not None:
                variable.assign(value)
