"""Train with keras_adam.Adam on two worker processes (MultiWorkerMirroredStrategy) and check
the result against one process training on the same global batches.

    python examples/multi_worker_training.py            # launches 2 workers on 127.0.0.1
    python examples/multi_worker_training.py --small    # the test suite's budget
    python examples/multi_worker_training.py --skip-nonfinite  # one NaN on one worker

Keras 3's `model.fit` does not run under MultiWorkerMirroredStrategy
(keras-team/keras#20585), so this is the custom-training-loop pattern:
`strategy.run` computes each replica's gradients on its half of every
global batch, and `optimizer.apply_gradients` inside it all-reduces them
and applies the same Adam step on every worker. The model has an Embedding
layer, whose gradients are sparse rows (`tf.IndexedSlices`), so the lazy
sparse path runs too (`--lazy-sparse`); dense layers use the fused kernel
unless `--no-fused`.

With `--skip-nonfinite`, one sample of step 3 is NaN, in the last worker's
half of the batch only: with `skip_nonfinite=True` every worker skips that
step (the verdict is all-reduced), as does the single process, and the
weights still match.

The launcher starts the workers (TF_CONFIG on free local ports), runs the
single-process reference itself, and prints the largest weight difference;
it exits non-zero if any worker fails or the difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WORKERS = 2
POISONED_STEP = 3  # with --skip-nonfinite (0-based)
VOCABULARY, FEATURES, CLASSES = 50, 8, 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="10 steps")
    parser.add_argument("--lazy-sparse", action="store_true", help="lazy sparse Embedding rows")
    parser.add_argument("--no-fused", action="store_true", help="the keras.ops reference path")
    parser.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip_nonfinite=True, and a NaN in one worker's half of step 3",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the workers")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.global_batch <= 0 or args.global_batch % WORKERS:
        parser.error(
            f"--steps must be positive and --global-batch a positive multiple of {WORKERS}"
        )
    if args.small:
        args.steps = 10
    if args.skip_nonfinite and args.steps <= POISONED_STEP:
        parser.error(f"--skip-nonfinite needs --steps > {POISONED_STEP}")
    return args


def dataset(global_batch: int, steps: int, poison: bool = False):
    """The same global batches everywhere: token ids and features, with labels.

    With `poison`, the last sample of step `POISONED_STEP` has a NaN feature.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    n = global_batch * steps
    tokens = rng.integers(0, VOCABULARY, size=(n, 4)).astype("int32")
    features = rng.normal(size=(n, FEATURES)).astype("float32")
    labels = ((features[:, 0] > 0).astype("int32") + (tokens[:, 0] % 2)).astype("int32")
    if poison:
        features[(POISONED_STEP + 1) * global_batch - 1, 0] = np.nan
    return tokens, features, labels


def build(optimizer_options: dict):
    import keras

    import keras_adam

    keras.utils.set_random_seed(0)
    tokens = keras.Input((4,), dtype="int32")
    features = keras.Input((FEATURES,))
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(VOCABULARY, 6)(tokens))
    hidden = keras.layers.Dense(16, activation="relu")(
        keras.layers.Concatenate()([embedded, features])
    )
    model = keras.Model([tokens, features], keras.layers.Dense(CLASSES)(hidden))
    optimizer = keras_adam.Adam(learning_rate=0.01, **optimizer_options)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def train(strategy, args: argparse.Namespace, shard: int, shards: int):
    """The custom training loop; each of `shards` workers takes its slice of every batch."""
    import keras
    import tensorflow as tf

    options = {"lazy_sparse": args.lazy_sparse}
    if args.no_fused:
        options["fused"] = False
    if args.skip_nonfinite:
        options["skip_nonfinite"] = True
    with strategy.scope():
        model, optimizer = build(options)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    tokens, features, labels = dataset(args.global_batch, args.steps, args.skip_nonfinite)
    per_worker = args.global_batch // shards

    def local_batches(context):
        data = tf.data.Dataset.from_tensor_slices((tokens, features, labels))
        data = data.batch(args.global_batch)
        # This worker's contiguous slice of every global batch.
        start = shard * per_worker
        return data.map(lambda t, f, y: (t[start:start + per_worker], f[start:start + per_worker],
                                         y[start:start + per_worker]))  # fmt: skip

    batches = strategy.distribute_datasets_from_function(local_batches)

    @tf.function
    def step(t, f, y):
        with tf.GradientTape() as tape:
            # Divide by the global batch: replicas' gradients are summed.
            loss = loss_fn(y, model([t, f], training=True)) / args.global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    for t, f, y in batches:
        strategy.run(step, args=(t, f, y))
    skipped = optimizer.skipped_steps
    return (
        [v.numpy() for v in model.trainable_variables],
        int(optimizer.iterations.numpy()),
        0 if skipped is None else int(skipped.numpy()),
    )


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_worker(args: argparse.Namespace) -> int:
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    weights, steps, skipped = train(strategy, args, shard=args.worker, shards=WORKERS)
    # Each worker writes its own result: all of them must have skipped.
    np.savez(f"{args.output}.{args.worker}.npz", *weights, steps=steps, skipped=skipped)
    return 0


def launch(args: argparse.Namespace) -> int:
    import numpy as np

    ports = free_ports(WORKERS)
    scratch = tempfile.mkdtemp(prefix="multi_worker_")
    output = os.path.join(scratch, "worker")
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    flags = [f"--steps={args.steps}", f"--global-batch={args.global_batch}"]
    flags += ["--lazy-sparse"] * args.lazy_sparse + ["--no-fused"] * args.no_fused
    flags += ["--skip-nonfinite"] * args.skip_nonfinite
    processes = []
    try:
        for index in range(WORKERS):
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            command = [sys.executable, os.path.abspath(__file__), *flags, f"--worker={index}"]
            command.append(f"--output={output}")
            processes.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
        deadline = time.monotonic() + args.timeout
        for index, process in enumerate(processes):
            try:
                _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"worker {index} did not finish in {args.timeout:g} s", file=sys.stderr)
                return 1
            if process.returncode != 0:
                print(f"worker {index} failed:\n{err.decode()[-3000:]}", file=sys.stderr)
                return 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    import tensorflow as tf

    reference, reference_steps, reference_skipped = train(
        tf.distribute.get_strategy(), args, shard=0, shards=1
    )
    workers = []
    for index in range(WORKERS):
        with np.load(f"{output}.{index}.npz") as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(reference))]
            workers.append((weights, int(saved["steps"]), int(saved["skipped"])))
    shutil.rmtree(scratch, ignore_errors=True)
    difference = max(
        float(np.abs(a - b).max())
        for weights, _, _ in workers
        for a, b in zip(weights, reference, strict=True)
    )
    scale = max(float(np.abs(a).max()) for a in reference)
    steps = [s for _, s, _ in workers]
    skipped = [s for _, _, s in workers]
    print(f"{WORKERS} workers vs 1 process, {steps[0]} vs {reference_steps} Adam steps:")
    if args.skip_nonfinite:
        print(f"skipped steps: workers {skipped}, 1 process {reference_skipped}")
    print(f"max |weight difference| = {difference:.3g} (weights up to {scale:.3g})")
    expected_skips = int(args.skip_nonfinite)
    ok = (
        all(s == reference_steps == args.steps - expected_skips for s in steps)
        and all(s == reference_skipped == expected_skips for s in skipped)
        and difference <= 1e-5
    )
    print("match" if ok else "MISMATCH")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_worker(args) if args.worker is not None else launch(args)


if __name__ == "__main__":
    sys.exit(main())
