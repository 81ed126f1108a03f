"""LSTM training-step and inference speed: lstm_tf vs keras.layers vs torch.nn, on this machine.

    python benchmarks/lstm_throughput.py            # the sweep (B=64, D=128; T x units)
    python benchmarks/lstm_throughput.py --quick    # only the reference shape T=100, units=256

A training step = forward + backward of a [B, T, D] float32 batch (return_sequences, loss = mean
of squared outputs) with the gradient of every weight; inference = forward only. Every contender
runs in graph mode (tf.function; torch eager, as torch users run it), interleaved round by round
(who goes first rotates) so that machine noise hits all alike; TensorFlow's contenders first,
then torch's, whose spinning OpenMP threads would slow down the next contender; the table gives
medians and ratios to Keras. GFLOP/s counts the LSTM matmuls (3x the forward's for a training
step) against a 2048x2048 matmul measured in the same run. Peak memory: the peak of TensorFlow's
CPU allocator (`tf.config.experimental.get_memory_info`), or where it keeps no statistics the growth
of the peak resident set, during one training step at T=1000,
units=256, each contender in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # each contender and shape is traced anew, by design

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lstm_tf  # noqa: E402

try:
    import torch
except ImportError:  # the `bench` extra
    torch = None

BATCH, FEATURES = 64, 128
NAMES = ["lstm_tf.LSTM", "keras.LSTM", "torch.LSTM",
         "lstm_tf.Bidirectional", "keras.Bidirectional", "torch.LSTM(bi)"]


def _tf_contender(name: str, units: int, steps: int) -> tuple:
    """(train_step, infer) tf.functions for one contender, built on a fixed batch."""
    if name == "lstm_tf.LSTM":
        layer = lstm_tf.LSTM(units, return_sequences=True)
    elif name == "keras.LSTM":
        layer = keras.layers.LSTM(units, return_sequences=True)
    elif name == "lstm_tf.Bidirectional":
        layer = lstm_tf.Bidirectional(lstm_tf.LSTM(units, return_sequences=True))
    else:
        layer = keras.layers.Bidirectional(keras.layers.LSTM(units, return_sequences=True))
    x = tf.constant(np.random.default_rng(0).normal(size=(BATCH, steps, FEATURES)), tf.float32)
    layer(x)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x, training=True)))
        return tape.gradient(loss, layer.trainable_variables)

    @tf.function
    def infer():
        return layer(x, training=False)

    return (lambda: [g.numpy() for g in train_step()]), (lambda: infer().numpy())


def _torch_contender(name: str, units: int, steps: int) -> tuple:
    lstm = torch.nn.LSTM(FEATURES, units, batch_first=True, bidirectional="bi" in name)
    x = torch.from_numpy(
        np.random.default_rng(0).normal(size=(BATCH, steps, FEATURES)).astype("float32"))

    def train_step():
        lstm.zero_grad()
        (lstm(x)[0] ** 2).mean().backward()

    def infer():
        with torch.no_grad():
            return lstm(x)[0]

    return train_step, infer


def contender(name: str, units: int, steps: int) -> tuple:
    return (_torch_contender if name.startswith("torch") else _tf_contender)(name, units, steps)


def lstm_gflop(units: int, steps: int, directions: int, training: bool) -> float:
    forward = 2 * BATCH * steps * (FEATURES + units) * 4 * units * directions
    return forward * (3 if training else 1) / 1e9


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a = tf.random.normal([n, n])
    mm = tf.function(lambda: tf.matmul(a, a))
    mm().numpy()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mm().numpy()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def sweep(shapes: list[tuple[int, int]], rounds: int) -> None:
    names = [n for n in NAMES if torch is not None or not n.startswith("torch")]
    peak = matmul_peak_gflops()
    print(f"Measured on this machine, {os.cpu_count()} CPUs; TF {tf.__version__}, "
          f"Keras {keras.__version__}"
          f"{', torch ' + torch.__version__ if torch else ''}; float32; batch {BATCH}, "
          f"input {FEATURES}; matmul peak (2048^2) {peak:.0f} GFLOP/s.\n")
    print("| T | units | contender | train ms | vs Keras | GFLOP/s | infer ms | vs Keras |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for steps, units in shapes:
        fns = {name: contender(name, units, steps) for name in names}
        for train, infer in fns.values():  # trace / warm up
            train()
            infer()
        times = {(name, kind): [] for name in names for kind in ("train", "infer")}
        # TensorFlow's contenders interleaved, then torch's: torch's OpenMP threads spin after
        # each call and slowed down whichever TF contender ran next (0.75x instead of 0.96x).
        for group in ([n for n in names if not n.startswith("torch")],
                      [n for n in names if n.startswith("torch")]):
            for r in range(rounds if group else 0):
                for name in group[r % len(group):] + group[:r % len(group)]:  # rotate the first
                    train, infer = fns[name]
                    for kind, fn in (("train", train), ("infer", infer)):
                        start = time.perf_counter()
                        fn()
                        times[name, kind].append(time.perf_counter() - start)
        med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        for name in names:
            bi = "Bidirectional" in name or "(bi)" in name
            ref = "keras.Bidirectional" if bi else "keras.LSTM"
            gflops = lstm_gflop(units, steps, 2 if bi else 1, True) / med[name, "train"] * 1e3
            print(f"| {steps} | {units} | {name} | {med[name, 'train']:.1f} | "
                  f"{med[ref, 'train'] / med[name, 'train']:.2f}x | {gflops:.0f} | "
                  f"{med[name, 'infer']:.1f} | {med[ref, 'infer'] / med[name, 'infer']:.2f}x |",
                  flush=True)


def peak_memory(names: list[str], steps: int = 1000, units: int = 256) -> None:
    print(f"\n| T={steps}, units={units}, one training step | peak memory | measured by |")
    print("| --- | ---: | --- |")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--memory_child", name,
                              "--steps", str(steps), "--units", str(units)],
                             capture_output=True, text=True, check=True).stdout
        value, method = out.strip().splitlines()[-1].split()
        how = ("TF CPU allocator peak" if method == "allocator"
               else "peak RSS growth (no allocator statistics on this CPU)")
        print(f"| {name} | {float(value):.0f} MiB | {how} |", flush=True)


def memory_child(name: str, steps: int, units: int) -> None:
    """Prints the peak memory (MiB) of one training step, and how it was measured.

    TensorFlow's CPU allocator statistics where it keeps them; where it does not
    (`reset_memory_stats` raises "Cannot reset memory stats" on some CPUs), the
    process's peak resident set (`ru_maxrss`) after the step minus its resident set
    before it: it counts everything the step allocates, TensorFlow's pools included,
    and is an upper bound (the peak may be the first, tracing call's, if that was
    higher; memory the allocator kept from that call is reused, not counted).
    """
    train, _ = contender(name, units, steps)
    train()  # trace
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError:
        before = _resident_mib()
        train()
        print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before} rss")
        return
    train()
    print(f"{tf.config.experimental.get_memory_info('CPU:0')['peak'] / 2**20} allocator")


def _resident_mib() -> float:
    """The process's current resident memory (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _shape(text: str) -> tuple[int, int]:
    """`--shape T,units`, two positive integers."""
    try:
        steps, units = (_positive(v) for v in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not T,units (two positive integers)") from None
    return steps, units


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only T=100, units=256")
    parser.add_argument("--shape", action="append", default=[], type=_shape,
                        help="T,units to run instead of the sweep (repeatable)")
    parser.add_argument("--rounds", type=_positive, default=7)
    parser.add_argument("--no_torch", action="store_true", help="leave torch out")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--units", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.no_torch:
        global torch
        torch = None
    if args.memory_child:
        return memory_child(args.memory_child, args.steps, args.units)
    if args.shape:
        shapes = args.shape
    elif args.quick:
        shapes = [(100, 256)]
    else:
        shapes = [(t, u) for t in (50, 100, 400) for u in (128, 256, 512)]
    sweep(shapes, args.rounds)
    if not args.no_memory:
        peak_memory(["lstm_tf.LSTM", "keras.LSTM"])


if __name__ == "__main__":
    main()
