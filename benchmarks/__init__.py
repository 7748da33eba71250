"""Side-by-side benchmarks of Adam implementations: `python -m benchmarks`.

Every system runs in one process on the same workloads, interleaved round by
round, and the report gives medians and ratios (against Keras's Adam, against
torch's fused Adam, and against a memory-bandwidth floor), peak memory and
first-call (trace/compile) time, as a markdown table, JSON and a PNG plot.
"""
