"""What runs on the TensorFlow backend.

- Dense gradients, fused path (default where it applies): outside XLA on
  CPU, one multi-tensor op per dtype and device updates all fused variables
  of a step (`KerasAdamMultiTensorApplyAdam`, `keras_adam.kernels`); under
  tf.distribute the same op once per variable (each replica's update runs
  on its own). Under XLA, on other devices and where the kernels are
  unavailable, the `keras.ops` step, which is Keras's own arithmetic and
  which XLA compiles to the speed of Keras's Adam under XLA.
- `tf.IndexedSlices` gradients (Embedding layers): densified, or with
  `lazy_sparse=True` only the touched rows: one `KerasAdamSparseApplyAdam`
  op outside XLA on CPU, else gathers and scatters of `keras.ops`.
- Quantized moments (`moment_dtype="int8"` or `"int4"`) of float32
  variables, outside XLA on CPU: one `KerasAdamMultiTensorQuantizedAdam` op
  per set of hyperparameters updates the variables and their moments in
  place; under tf.distribute one `KerasAdamQuantizedAdam` per variable
  component, whose results are assigned. Under XLA
  (`jit_compile=True`), on CPU, the same kernel as an XLA custom call
  (`kernels.quantized_tf_xla`, one per 32 variables), whose results are
  assigned.
- Everything else: the `keras.ops` transcription of `keras_adam.update_rule`.
- `skip_nonfinite`: the whole step under `tf.cond`, with one verdict summed
  over the replicas (and workers) of a tf.distribute strategy.

Every path gives Keras's numbers: the kernels take the step's
`update_rule.StepScalars` (1 − β1, 1 − β2 and the bias-corrected step size
computed as `keras.optimizers.Adam.update_step` computes them).
TensorFlow's `ResourceApplyAdam` is not used: it computes 1 − β from the
β rounded to the variable's dtype, off Keras's 1 − β2.

Without a strategy the engine runs the whole step itself; under
tf.distribute it sums the gradients over the replicas and updates each
variable's components through `strategy.extended.update`, as Keras does.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.ops import control_flow_util  # is this graph compiled by XLA?

from keras_adam import kernels, quantization, update_rule
from keras_adam.backends.engine import (
    Engine,
    KerasApply,
    Options,
    ScalarsCache,
    Update,
    compute_dtype,
    moments,
    quantized_kernel_flags,
    quantized_kernel_scalars,
)
from keras_adam.kernels import quantized as quantized_kernel
from keras_adam.quantization import QuantizedMoment
from keras_adam.update_rule import StepScalars


def _tensor(x: Any) -> Any:
    """The `tf.Variable` or tensor behind a `keras.Variable` (anything else as is)."""
    return x.value if isinstance(x, keras.Variable) else x


def _in_xla() -> bool:
    """Whether the graph being built is compiled by XLA."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _kernel_module(*variables: Any) -> Any | None:
    """The loaded `keras_adam.kernels` library where its ops can update `variables`.

    They can outside XLA (the ops have no XLA kernel), on CPU variables, and
    where the library is available (`keras_adam.kernels.load`); else None.
    """
    if _in_xla():
        return None
    for x in variables:
        if tf.DeviceSpec.from_string(x.device or "").device_type not in (None, "CPU"):
            return None
    return kernels.load()


def _kernel_scalars(scalars: StepScalars) -> dict:
    """The scalar inputs our kernels share, from the step's scalars."""
    dtype = scalars.dtype
    return dict(
        alpha=scalars.alpha,
        one_minus_beta1=tf.constant(scalars.one_minus_beta_1, dtype),
        one_minus_beta2=tf.constant(scalars.one_minus_beta_2, dtype),
        epsilon=tf.constant(scalars.epsilon, dtype),
    )


#: The quantized ops' table inputs, in their order.
_TABLE_INPUTS = ("m_table", "m_mid", "m_lut", "v_table", "v_mid", "v_lut")


def _quantized_lookups(m_lookup: dict, v_lookup: dict) -> dict:
    """The quantized ops' table inputs and format attributes, by name.

    From the formats' lookups (`quantization.Format.lookup`).
    """
    return {
        "m_table": m_lookup["table"],
        "m_mid": m_lookup["magnitude_mid"],
        "m_lut": m_lookup["lut"],
        "v_table": v_lookup["table"],
        "v_mid": v_lookup["magnitude_mid"],
        "v_lut": v_lookup["lut"],
        "m_zero": m_lookup["zero"],
        "lut_shift": m_lookup["lut_shift"],
        "m_lut_base": m_lookup["lut_base"],
        "v_lut_base": v_lookup["lut_base"],
    }


def _coalesce_rows(gradient: Any) -> tuple[Any, Any]:
    """Sum the slices of repeated indices of a `tf.IndexedSlices`.

    Outside XLA, `tf.unique` finds the distinct rows in one hashing pass and
    only those rows are updated. XLA has no kernel for `tf.unique` (its
    output shape depends on the data), so under XLA the indices are sorted
    instead (`_sorted_positions`) and every position carries its row's
    total: repeated positions then compute and write identical rows, and
    shapes stay static.

    Returns:
        `(rows, totals)`: row indices, and for each the sum of all slices
        with that index.
    """
    indices = gradient.indices
    if not _in_xla():
        rows, segment = tf.unique(indices)
        return rows, tf.math.unsorted_segment_sum(gradient.values, segment, tf.shape(rows)[0])
    rows, order = _sorted_positions(indices)
    values = tf.gather(gradient.values, order)
    previous = tf.concat([tf.constant([-1], dtype=rows.dtype), rows[:-1]], axis=0)
    segment = tf.cumsum(tf.cast(tf.not_equal(rows, previous), tf.int32)) - 1
    totals = tf.math.unsorted_segment_sum(values, segment, tf.shape(rows)[0])
    return rows, tf.gather(totals, segment)


def _sorted_positions(indices: Any) -> tuple[Any, Any]:
    """`(sorted indices, their positions)` under XLA, a stable sort with static shapes.

    Not `tf.argsort`: it calls `top_k` with `k` a tensor, which XLA lowers
    with `set-dimension-size`, a dynamic shape. One dynamic shape makes XLA's
    dynamic padder inline every called computation of the program, and
    among them the Philox generator of each `Dropout`, which is then fused
    into every consumer and recomputed element by element. `XlaSort`
    of one int64 key per position, `index * n + position`, sorts with
    static shapes, and the keys are distinct, so the order is the stable one.
    """
    from tensorflow.compiler.tf2xla.python import xla

    n = tf.shape(indices, out_type=tf.int64)[0]
    keys = xla.sort(tf.cast(indices, tf.int64) * n + tf.range(n, dtype=tf.int64))
    return tf.cast(keys // n, indices.dtype), tf.cast(keys % n, tf.int32)


class TensorFlowEngine(Engine):
    """The TensorFlow engine: our kernels, sparse rows, tf.distribute."""

    sparse_gradients = True

    # -- which path ------------------------------------------------------------

    def fused_blockers(self, options: Options) -> list[str]:
        """Why the options rule out the fused kernels (empty if they don't)."""
        hyper = options.hyper
        blockers = []
        if hyper.epsilon_mode != "hat":
            blockers.append('epsilon_mode="paper" (the kernels add ε before bias correction)')
        if hyper.amsgrad:
            blockers.append("amsgrad=True (the kernels keep no running maximum of v)")
        if hyper.rectify:
            blockers.append("rectify=True")
        return blockers

    def variable_blocker(self, variable: Any, options: Options) -> str | None:
        """Why `variable` cannot take the fused kernels (None if it can)."""
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if dtype not in ("float32", "float64"):
            return (
                f"its dtype is {dtype}; the kernels compute in the variable's dtype, "
                "so only float32 and float64 are fused"
            )
        storage = options.moment_storage(variable)
        if storage in quantization.QUANTIZED_DTYPES:
            return f"its moments are quantized (moment_dtype={storage!r})"
        if storage not in (None, dtype):
            return f"moment_dtype={options.moment_dtype!r} differs from its dtype {dtype}"
        return None

    def restore_scope(self) -> contextlib.AbstractContextManager:
        """`fit` may build inside a traced function: restore eagerly."""
        return tf.init_scope()

    def build_scope(self) -> contextlib.AbstractContextManager:
        """Inside a traced function without a distribution strategy: eagerly (`tf.init_scope`).

        Without a strategy, `model.fit` on TensorFlow leaves the optimizer's
        `build` to the first traced training step. Keras lifts each variable's
        creation out of the trace one at a time, which costs about 10-15 ms a
        variable (0.4-0.6 s for a small transformer's 38); run eagerly as a
        whole, the same build takes 0.04 s, and the traced graph is the same.
        Under a strategy Keras builds before tracing (in the strategy's
        scope), and a build in a replica context is left as it is.
        """
        if tf.inside_function() and not tf.distribute.has_strategy():
            return tf.init_scope()
        return contextlib.nullcontext()

    def stored_values(self, gradient: Any) -> Any:
        """A `tf.IndexedSlices` gradient's values, else the gradient itself."""
        return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient

    # -- skipping non-finite steps ---------------------------------------------

    def apply_skipping_nonfinite(self, step: KerasApply, counter: Any) -> None:
        """The whole step under `tf.cond(all gradients finite)`; else count the skip.

        Under tf.distribute the count of bad gradients is summed over all
        replicas and workers: a replica that skipped alone would
        desynchronize the collectives of the step.
        """
        run, grads, trainable_variables = step.run, step.grads, step.trainable_variables
        nonfinite = self.count_nonfinite(grads)

        def skip() -> None:
            counter.assign_add(1)

        def cross_replica(strategy: Any, nonfinite: Any, grads: Any, variables: Any) -> None:
            # The step calls `merge_call`, which a condition in replica
            # context cannot contain: decide here, then run every replica on
            # its own gradients (passed in, so they arrive per replica).
            count = strategy.experimental_local_results(nonfinite)[0]
            ops.cond(
                ops.equal(count, 0),
                lambda: strategy.extended.call_for_each_replica(run, args=(grads, variables)),
                skip,
            )

        if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
            context = tf.distribute.get_replica_context()
            nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM, nonfinite)
            if not tf.__internal__.distribute.strategy_supports_no_merge_call():
                context.merge_call(cross_replica, args=(nonfinite, grads, trainable_variables))
                return
        ops.cond(ops.equal(nonfinite, 0), step, skip)

    # -- the step ----------------------------------------------------------------

    def update(self, update: Update) -> None:
        """One step of all variables.

        Without a strategy, the fused variables of a dtype, device and
        hyperparameters go to one multi-tensor op, the others one by one
        (`update_one`). Under tf.distribute, as Keras: the gradients are
        summed over the replicas, then each variable's components are
        updated through `strategy.extended.update`.
        """
        scalars = ScalarsCache(update)
        if tf.distribute.has_strategy():
            self._update_distributed(update, scalars)
            return
        # No all-reduce without a strategy: there is nothing to sum, and
        # TensorFlow's all-reduce traced in a `tf.function` registers a custom
        # gradient in a process-wide registry that is never emptied, keeping
        # every traced train step alive (TensorFlow issue #97697).
        groups: dict[tuple, tuple[list, ...]] = {}
        quantized: dict[tuple, tuple[list, ...]] = {}
        for grad, variable in zip(update.grads, update.variables, strict=True):
            if grad is None:
                continue
            if isinstance(grad, tf.IndexedSlices) and not update.options.lazy_sparse:
                grad = tf.convert_to_tensor(grad)
            slots = update.slots(variable)
            kernel = None
            if not isinstance(grad, tf.IndexedSlices):
                kernel = self._quantized_kernel(variable, slots, update)
            if kernel is not None:
                key = (kernel, update.hyper(variable))
                group = quantized.setdefault(key, ([], [], [], [], []))
                for members, x in zip(group, (variable, grad, *moments(slots)), strict=True):
                    members.append(x)
                continue
            if isinstance(grad, tf.IndexedSlices) or not self._fused(variable, slots, update):
                self.update_one(grad, variable, update, scalars)
                continue
            var = _tensor(variable)
            m, v, _ = moments([_tensor(x) for x in slots])
            hyper = update.hyper(variable)
            group = groups.setdefault((var.dtype, var.device, hyper), ([], [], [], [], []))
            for members, x in zip(group, (var, grad, m, v, None), strict=True):
                members.append(x)
        for (dtype, _, hyper), group in groups.items():
            self.multi_tensor(*group, scalars(dtype.name, hyper))
        for (kernel, hyper), group in quantized.items():
            path = self.quantized_multi_tensor if kernel == "op" else self.quantized_xla
            path(*group, scalars("float32", hyper))

    def _update_distributed(self, update: Update, scalars: ScalarsCache) -> None:
        """`update` under a tf.distribute strategy (Keras's `_backend_update_step`)."""
        grads = list(update.grads)
        context = tf.distribute.get_replica_context()
        present = [i for i, g in enumerate(grads) if g is not None]
        if context is not None and present:
            reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
            for i, g in zip(present, reduced, strict=True):
                grads[i] = g

        def update_all(strategy: Any, grads: list) -> None:
            for grad, variable in zip(grads, update.variables, strict=True):
                if grad is None:
                    continue

                def update_component(component: Any, grad: Any, variable: Any = variable) -> None:
                    self.update_one(grad, variable, update, scalars, param=component)

                strategy.extended.update(
                    _tensor(variable), update_component, args=(grad,), group=False
                )

        tf.__internal__.distribute.interim.maybe_merge_call(
            update_all, tf.distribute.get_strategy(), grads
        )

    def update_one(
        self,
        grad: Any,
        variable: Any,
        update: Update,
        scalars: ScalarsCache,
        param: Any = None,
    ) -> None:
        """One variable: lazy rows, the fused kernel, or the reference path.

        Args:
            grad: Its gradient, dense or `tf.IndexedSlices`.
            variable: The model variable.
            update: The step.
            scalars: The step's scalars.
            param: The variable to write (under tf.distribute, the component
                of `variable` on this device); `variable` if None.
        """
        slots = update.slots(variable)
        m, v, v_hat = moments(slots)
        dtype, hyper = compute_dtype(variable, slots), update.hyper(variable)
        fused = self._fused(variable, slots, update)
        step = scalars(dtype, hyper) if fused else scalars.fresh(dtype, hyper)
        params = [variable if param is None else param]
        if isinstance(grad, tf.IndexedSlices):
            if update.options.lazy_sparse:
                path = self.sparse_rows if fused else self.rows_reference
                path(params, [grad], [m], [v], [v_hat], step)
                return
            grad = tf.convert_to_tensor(grad)
        kernel = None if fused else self._quantized_kernel(variable, slots, update)
        if kernel is not None:
            path = self.quantized if kernel == "op" else self.quantized_xla
            step = scalars(dtype, hyper)
        else:
            path = self.multi_tensor if fused else self.reference
        path(params, [grad], [m], [v], [v_hat], step)

    def _quantized_kernel(self, variable: Any, slots: list, update: Update) -> str | None:
        """Which kernel steps `variable`, with quantized moments `slots`, if one does.

        "op": our TensorFlow ops (`quantized_multi_tensor`, or `quantized`
        under tf.distribute), outside XLA with the library loaded; "xla":
        the XLA custom call (`quantized_xla`), under XLA where its library
        loads; None: the reference path. Only float32 variables on CPU,
        without `fused=False` or RAdam, take a kernel.
        """
        options = update.options
        if not (
            isinstance(slots[0], QuantizedMoment)
            and options.fused is not False
            and not options.hyper.rectify
            and keras.backend.standardize_dtype(variable.dtype) == "float32"
        ):
            return None
        if _in_xla():
            from keras_adam.kernels import quantized_tf_xla

            device = tf.DeviceSpec.from_string(_tensor(variable).device or "").device_type
            return "xla" if device in (None, "CPU") and quantized_tf_xla.available() else None
        return "op" if _kernel_module(_tensor(variable)) is not None else None

    def _fused(self, variable: Any, slots: list, update: Update) -> bool:
        """Whether `variable` (with its moments `slots`) takes our kernels.

        That is: the options, its dtypes, its device, and not under XLA.
        """
        options = update.options
        if not self.fuses(options) or self.variable_blocker(variable, options) is not None:
            return False
        return _kernel_module(_tensor(variable), *map(_tensor, slots)) is not None

    def assign(self, variable: Any, value: Any) -> None:
        """Keras's TensorFlow `assign`: cast, then assign or scatter rows."""
        variable = _tensor(variable)
        value = tf.cast(value, variable.dtype)
        if isinstance(value, tf.IndexedSlices):
            variable.scatter_update(value)
        else:
            variable.assign(value)

    # -- the paths (one signature: params, grads, ms, vs, v_hats, scalars) ------

    def multi_tensor(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Dense gradients in one `KerasAdamMultiTensorApplyAdam` op.

        One pass per element over every variable of the group (one dtype,
        device and hyperparameters, outside XLA, on CPU). Maximize, L2 and
        decoupled weight decay are applied around it by the functions that
        `update_rule.adam_step` uses; the op takes Keras's scalars.
        """
        hyper = scalars.hyper
        handles, gradients = [], []
        for param, grad in zip(params, grads, strict=True):
            var = _tensor(param)
            gradients.append(update_rule.effective_gradient(tf.cast(grad, var.dtype), var, hyper))
            if hyper.weight_decay and hyper.decoupled_weight_decay:
                var.assign(update_rule.decoupled_decay(var, hyper, scalars.learning_rate))
            handles.append(var.handle)
        kernels.load().keras_adam_multi_tensor_apply_adam(
            var=handles,
            m=[_tensor(x).handle for x in ms],
            v=[_tensor(x).handle for x in vs],
            grad=gradients,
            **_kernel_scalars(scalars),
        )

    def quantized_multi_tensor(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Quantized moments in one `KerasAdamMultiTensorQuantizedAdam` op.

        It decodes, steps (every option but RAdam) and encodes one pass per
        block, in place, over every variable of the group (one set of
        hyperparameters): the variables and their moments go in as resource
        handles, so nothing is assigned afterwards.
        """
        hyper = scalars.hyper
        m_lookup, v_lookup = ms[0].fmt.lookup, vs[0].fmt.lookup
        amsgrad = hyper.amsgrad

        def handles(moments: list) -> list:
            return [_tensor(moment.variable).handle for moment in moments]

        kernels.load().keras_adam_multi_tensor_quantized_adam(
            var=[_tensor(param).handle for param in params],
            m=handles(ms),
            v=handles(vs),
            v_hat=handles(v_hats) if amsgrad else [],
            grad=[tf.cast(grad, tf.float32) for grad in grads],
            **_quantized_lookups(m_lookup, v_lookup),
            scalars=quantized_kernel_scalars(scalars),
            bits=ms[0].fmt.bits,
            block=ms[0].fmt.block_size,
            **quantized_kernel_flags(hyper),
        )

    def quantized(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Quantized moments in `KerasAdamQuantizedAdam` ops, one per variable.

        Each op decodes, steps (every option but RAdam) and encodes one pass
        per block and returns the new variable and moments, which are
        assigned.
        """
        hyper = scalars.hyper
        step_scalars = quantized_kernel_scalars(scalars)
        for param, grad, m, v, v_hat in zip(params, grads, ms, vs, v_hats, strict=True):
            m_lookup, v_lookup = m.fmt.lookup, v.fmt.lookup
            moments = [m, v, v_hat] if v_hat is not None else [m, v]
            stored = quantized_kernel.stored_moments(moments, tf.zeros([0], tf.uint8))
            lookups = _quantized_lookups(m_lookup, v_lookup)
            outputs = kernels.load().keras_adam_quantized_adam(
                tf.convert_to_tensor(_tensor(param)),
                tf.cast(grad, tf.float32),
                *stored,
                *(lookups.pop(name) for name in _TABLE_INPUTS),
                step_scalars,
                bits=m.fmt.bits,
                block=m.fmt.block_size,
                **lookups,
                **quantized_kernel_flags(hyper),
            )
            self._assign_stepped(param, moments, outputs[0], outputs[1 : 1 + len(moments)])

    def quantized_xla(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Quantized moments under XLA: custom calls of `kernels.quantized_tf_xla`.

        Each call decodes, steps (every option but RAdam) and encodes one
        pass per block, over up to 32 variables of one set of
        hyperparameters, and returns the new variables and moments, which
        are assigned.
        """
        from keras_adam.kernels import quantized_tf_xla

        hyper = scalars.hyper
        slots = [
            [m, v, v_hat] if hyper.amsgrad else [m, v]
            for m, v, v_hat in zip(ms, vs, v_hats, strict=True)
        ]
        stepped = quantized_tf_xla.step(
            [tf.convert_to_tensor(_tensor(param)) for param in params],
            [tf.cast(grad, tf.float32) for grad in grads],
            slots,
            quantized_kernel_scalars(scalars),
            quantized_kernel_flags(hyper),
        )
        for param, own, (value, stored) in zip(params, slots, stepped, strict=True):
            self._assign_stepped(param, own, value, stored)

    def _assign_stepped(self, param: Any, moments: list, value: Any, stored: list) -> None:
        """Assign a quantized step's results: the variable, and each moment's stored buffer."""
        self.assign(param, value)
        for moment, new in zip(moments, stored, strict=True):
            moment.variable.assign(new)

    def sparse_rows(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Lazy rows of `tf.IndexedSlices` gradients in `KerasAdamSparseApplyAdam` ops.

        Each op sums repeated indices, then updates the touched rows of the
        variable and its moments in place, with maximize and weight decay,
        at a cost in proportion to the rows touched. Nothing here reads the
        table: a read still alive when the op runs would make it copy the
        whole table.
        """
        hyper = scalars.hyper
        dtype = scalars.dtype
        for param, grad, m, v in zip(params, grads, ms, vs, strict=True):
            kernels.load().keras_adam_sparse_apply_adam(
                var=_tensor(param).handle,
                m=_tensor(m).handle,
                v=_tensor(v).handle,
                grad=tf.cast(grad.values, dtype),
                indices=grad.indices,
                weight_decay=tf.constant(hyper.weight_decay, dtype),
                decoupled_weight_decay=hyper.decoupled_weight_decay,
                maximize=hyper.maximize,
                lr=scalars.learning_rate,
                **_kernel_scalars(scalars),
            )

    def rows_reference(
        self, params: list, grads: list, ms: list, vs: list, v_hats: list, scalars: StepScalars
    ) -> None:
        """Lazy rows with `update_rule.adam_step` on gathered rows, then scatters.

        Repeated indices are summed first (`_coalesce_rows`); it compiles
        under XLA and runs with every option.
        """
        dtype = scalars.dtype
        for param, grad, m, v, v_hat in zip(params, grads, ms, vs, v_hats, strict=True):
            rows, row_gradients = _coalesce_rows(grad)

            def read_rows(x: Any, rows: Any = rows) -> Any:
                return None if x is None else ops.cast(tf.gather(_tensor(x), rows), dtype)

            new = update_rule.adam_step(
                read_rows(param),
                ops.cast(row_gradients, dtype),
                read_rows(m),
                read_rows(v),
                read_rows(v_hat),
                scalars,
            )
            # The gradient's own dense shape: reading the variable's shape would
            # read the variable, and a scatter into a variable whose value is
            # still referenced copies the whole table.
            shape = grad.dense_shape
            for slot, value in zip((m, v, v_hat), new[1:], strict=True):
                if slot is not None:
                    self.assign(slot, tf.IndexedSlices(value, rows, shape))
            self.assign(param, tf.IndexedSlices(new.param, rows, shape))
