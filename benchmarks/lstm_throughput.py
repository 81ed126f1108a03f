"""LSTM training-step and inference speed: lstm_tf vs keras.layers vs torch.nn, on this machine.

    python benchmarks/lstm_throughput.py              # the sweep (below), ~15 min on 2 cores
    python benchmarks/lstm_throughput.py --quick      # the reference shape: B=64, T=100, 256 units
    python benchmarks/lstm_throughput.py --shape 16,50,32 --masked   # B,T,units (repeatable)
    python benchmarks/lstm_throughput.py --main_job   # the sentiment recipe's own training step
    python benchmarks/lstm_throughput.py --precision --masked  # float32 vs mixed precision

A training step = forward + backward of a `[B, T, 128]` float32 batch (return_sequences, loss =
mean of squared outputs) with the gradient of every weight; inference = forward only. With
`--masked` (and in the sweep's masked rows) every batch is right-padded to T with a mask, real
lengths drawn in [T/2, T]; torch runs the padded batch as its users do without packing ("torch")
and, for comparison, packed (`pack_padded_sequence`, "torch packed"). TensorFlow's contenders run
in graph mode (`tf.function`), torch eagerly, as each is used. Contenders are interleaved round by
round in a random order, TensorFlow's first, then torch's (whose spinning OpenMP threads slow
down whichever contender runs next); the tables give medians over the rounds and ratios to keras.
GFLOP/s counts the LSTM matmuls (3x the forward's for a training step), against this machine's
float32 matmul rate measured in the same run (a 2048x2048 product in TensorFlow). Peak memory:
one training step (B=64, T=1000, 128 -> 256 units) per contender, each in a fresh process: the
peak of TensorFlow's CPU allocator where it keeps statistics (not for torch), else the growth of
the peak resident set.

`--main_job`: the training step of `python -m recipes.sentiment` (default config) on real IMDB
batches as the recipe builds them (bucketed by length, right-padded, masked): the recipe's
model (lstm_tf), the same model of keras.layers, and of torch.nn (the same embedding, Bi-LSTM,
masked mean/max pooling and head, Adam with clipping; torch unpacked), each timed over the same
batches after warming up on them (torch's oneDNN LSTM needs about five calls per new shape
before it reaches its speed: the warm-up takes minutes).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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

FEATURES = 128
WARMUP = 6  # calls: torch's oneDNN LSTM takes about five per new shape to reach its speed
# The sweep: (batch, T, units) at 32-512 units and T 50-500, each unmasked and masked.
SWEEP = [(64, 100, u) for u in (32, 64, 128, 256, 512)] + [
    (16, 50, 32), (16, 200, 128), (16, 500, 256), (64, 50, 64), (64, 500, 128), (64, 200, 512)]


def cpu_name() -> str:
    """The CPU model and whether it has AVX-512 (`/proc/cpuinfo`), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return f"{model}, {'AVX-512' if 'avx512f' in info else 'no AVX-512'}"


def batch(batch_size: int, steps: int, masked: bool) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, steps, FEATURES)).astype("float32")
    if not masked:
        return x, None
    lengths = rng.integers((steps + 1) // 2, steps + 1, size=batch_size)
    lengths[0] = steps
    return x, np.arange(steps)[None] < lengths[:, None]


def tf_contender(name: str, units: int, x: np.ndarray, mask: np.ndarray | None) -> tuple:
    """(train_step, infer) for one TensorFlow contender, built on a fixed batch."""
    make = lstm_tf.LSTM if name.startswith("lstm_tf") else keras.layers.LSTM
    layer = make(units, return_sequences=True)
    if "bi" in name:
        layer = (lstm_tf.Bidirectional if name.startswith("lstm_tf")
                 else keras.layers.Bidirectional)(layer)
    x = tf.constant(x)
    mask = None if mask is None else tf.constant(mask)
    layer(x, mask=mask)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            outputs = tf.cast(layer(x, mask=mask, training=True), tf.float32)
            loss = tf.reduce_mean(tf.square(outputs))
        return tape.gradient(loss, layer.trainable_variables)

    @tf.function
    def infer():
        return layer(x, mask=mask, training=False)

    return (lambda: [g.numpy() for g in train_step()]), (lambda: infer().numpy())


def torch_contender(name: str, units: int, x: np.ndarray, mask: np.ndarray | None) -> tuple:
    lstm = torch.nn.LSTM(FEATURES, units, batch_first=True, bidirectional="bi" in name)
    x = torch.from_numpy(x)
    lengths = None if mask is None else torch.from_numpy(mask.sum(1))

    def forward():
        if "packed" not in name:
            return lstm(x)[0]
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                         enforce_sorted=False)
        return torch.nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True,
                                                      total_length=x.shape[1])[0]

    def train_step():
        lstm.zero_grad()
        (forward() ** 2).mean().backward()

    def infer():
        with torch.no_grad():
            return forward()

    return train_step, infer


def names_for(bidirectional: bool, masked: bool) -> list[str]:
    suffix = " bi" if bidirectional else ""
    names = [f"lstm_tf{suffix}", f"keras{suffix}"]
    if torch is not None:
        names += [f"torch{suffix}"] + ([f"torch packed{suffix}"] if masked else [])
    return names


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, run in a random order each round
    (TensorFlow's before torch's)."""
    times = {name: [] for name in fns}
    order = random.Random(0)
    for _ in range(rounds):
        tf_names = [n for n in fns if not n.startswith("torch")]
        torch_names = [n for n in fns if n.startswith("torch")]
        order.shuffle(tf_names)
        order.shuffle(torch_names)
        for name in tf_names + torch_names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def lstm_gflop(batch_size: int, steps: int, units: int, directions: int,
               training: bool) -> float:
    forward = 2 * batch_size * steps * (FEATURES + units) * 4 * units * directions
    return forward * (3 if training else 1) / 1e9


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
    """GFLOP/s of an n x n float32 matmul in TensorFlow (median of `reps`)."""
    a = tf.random.normal([n, n])
    mm = tf.function(lambda: tf.matmul(a, a))
    mm().numpy()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mm().numpy()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def header() -> str:
    versions = f"TF {tf.__version__}, Keras {keras.__version__}"
    if torch is not None:
        versions += f", torch {torch.__version__}"
    return f"{cpu_name()}; {os.cpu_count()} CPUs; {versions}; float32"


def sweep(shapes: list[tuple[int, int, int]], masks: list[bool], rounds: int) -> None:
    rate = matmul_rate()
    print(f"{header()}; input {FEATURES}; matmul rate (2048^2) {rate:.0f} GFLOP/s.\n")
    print("| B | T | units | mask | contender | train ms | vs keras | vs torch | GFLOP/s "
          "| of matmul | infer ms | vs keras | vs torch |")
    print("| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for batch_size, steps, units in shapes:
        for masked in masks:
            x, mask = batch(batch_size, steps, masked)
            for bidirectional in (False, True):
                names = names_for(bidirectional, masked)
                fns = {n: (torch_contender if n.startswith("torch") else tf_contender)(
                    n, units, x, mask) for n in names}
                for name, (train, infer) in fns.items():  # trace / warm up
                    for _ in range(WARMUP if name.startswith("torch") else 1):
                        train()
                        infer()
                train = interleaved({n: f[0] for n, f in fns.items()}, rounds)
                infer = interleaved({n: f[1] for n, f in fns.items()}, rounds)
                keras_name, torch_name = names[1], names[2] if torch else None
                for name in names:
                    flop = lstm_gflop(batch_size, steps, units, 2 if bidirectional else 1, True)
                    gflops = flop / train[name]
                    vs_torch = (f"{train[torch_name] / train[name]:.2f}x" if torch_name else "")
                    vs_torch_infer = (f"{infer[torch_name] / infer[name]:.2f}x"
                                      if torch_name else "")
                    print(f"| {batch_size} | {steps} | {units} | {'yes' if masked else 'no'} | "
                          f"{name} | {train[name] * 1e3:.1f} | "
                          f"{train[keras_name] / train[name]:.2f}x | {vs_torch} | "
                          f"{gflops:.0f} | {gflops / rate:.0%} | {infer[name] * 1e3:.1f} | "
                          f"{infer[keras_name] / infer[name]:.2f}x | {vs_torch_infer} |",
                          flush=True)


POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def precision(shapes: list[tuple[int, int, int]], masked: bool, rounds: int) -> None:
    """lstm_tf and keras.layers under each Keras dtype policy, interleaved, per shape."""
    print(f"{header().removesuffix('; float32')}; input {FEATURES}; "
          f"{'masked' if masked else 'unmasked'}; ratios to float32 of the same contender.\n")
    print("| B | T | units | contender | policy | train ms | vs float32 | infer ms | vs float32 |")
    print("| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for batch_size, steps, units in shapes:
        x, mask = batch(batch_size, steps, masked)
        fns = {}
        for policy in POLICIES:
            keras.mixed_precision.set_global_policy(policy)
            for name in ("lstm_tf", "keras", "lstm_tf bi", "keras bi"):
                fns[f"{name}, {policy}"] = tf_contender(name, units, x, mask)
        keras.mixed_precision.set_global_policy("float32")
        for train, infer in fns.values():
            train()
            infer()
        train = interleaved({key: f[0] for key, f in fns.items()}, rounds)
        infer = interleaved({key: f[1] for key, f in fns.items()}, rounds)
        for key in sorted(fns, key=lambda key: key.split(",")[0]):
            base = f"{key.split(',')[0]}, float32"
            print(f"| {batch_size} | {steps} | {units} | {key.replace(', ', ' | ')} | "
                  f"{train[key] * 1e3:.1f} | {train[base] / train[key]:.2f}x | "
                  f"{infer[key] * 1e3:.1f} | {infer[base] / infer[key]:.2f}x |", flush=True)


def peak_memory(names: list[str], steps: int = 1000, units: int = 256) -> None:
    print(f"\n| B=64, T={steps}, {FEATURES} -> {units} units, one training step | peak memory "
          "| measured by |")
    print("| --- | ---: | --- |")
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--memory_child", name,
                              "--steps", str(steps), "--units", str(units)],
                             capture_output=True, text=True, check=True).stdout
        value, method = out.strip().splitlines()[-1].split()
        how = "TF CPU allocator peak" if method == "allocator" else "peak RSS growth"
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
    x, mask = batch(64, steps, False)
    train, _ = (torch_contender if name.startswith("torch") else tf_contender)(
        name, units, x, mask)
    train()  # trace
    try:
        if name.startswith("torch"):  # (TensorFlow's allocator does not see torch's memory)
            raise ValueError
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


def main_job(batches: int, rounds: int) -> None:
    """The sentiment recipe's training step on its own batches: lstm_tf, keras, torch."""
    import main_job as job  # benchmarks/main_job.py: the recipe's data, the three models

    data = job.recipe_batches(batches)
    tokens = sum(int((ids > 0).sum()) for ids, _ in data) / len(data)
    print(f"{header()}.\nThe sentiment recipe's training step (default config: batch 64, "
          f"Embedding(10000, 128) -> Bi-LSTM(64) -> mean/max pooling -> Dense(1), Adam); "
          f"{len(data)} real training batches, T {min(i.shape[1] for i, _ in data)}-"
          f"{max(i.shape[1] for i, _ in data)}, {tokens:.0f} real tokens per batch.\n")
    steps = {name: job.contender(name) for name in job.NAMES
             if torch is not None or not name.startswith("torch")}
    passes = {name: (lambda step=step: [step(ids, labels) for ids, labels in data])
              for name, step in steps.items()}
    for name, run in passes.items():  # trace and compile every shape
        for _ in range(WARMUP if name.startswith("torch") else 1):
            run()
    seconds = interleaved(passes, rounds)
    print("| contender | ms per step | vs keras | vs torch |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in seconds.items():
        vs_torch = f"{seconds['torch'] / s:.2f}x" if "torch" in seconds else ""
        print(f"| {name} | {s / len(data) * 1e3:.1f} | {seconds['keras'] / s:.2f}x | "
              f"{vs_torch} |", flush=True)


def _shape(text: str) -> tuple[int, int, int]:
    """`--shape B,T,units`, three positive integers."""
    try:
        values = tuple(_positive(v) for v in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not B,T,units (three positive integers)")
    return values


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only B=64, T=100, 256 units")
    parser.add_argument("--shape", action="append", default=[], type=_shape,
                        help="B,T,units to run instead of the sweep (repeatable)")
    parser.add_argument("--masked", action="store_true",
                        help="with --shape/--quick: masked batches (the sweep runs both)")
    parser.add_argument("--rounds", type=_positive, default=7)
    parser.add_argument("--no_torch", action="store_true", help="leave torch out")
    parser.add_argument("--no_memory", action="store_true")
    parser.add_argument("--main_job", action="store_true",
                        help="the sentiment recipe's training step on real IMDB batches")
    parser.add_argument("--precision", action="store_true",
                        help="lstm_tf and keras under float32, mixed_bfloat16 and mixed_float16 "
                             "(--shape/--quick, else B=64, T=100 at 64 and 512 units)")
    parser.add_argument("--batches", type=_positive, default=12,
                        help="--main_job: how many of the recipe's batches")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--units", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.no_torch:
        global torch
        torch = None
    if args.memory_child:
        return memory_child(args.memory_child, args.steps, args.units)
    if args.main_job:
        return main_job(args.batches, args.rounds)
    if args.precision:
        return precision(args.shape or [(64, 100, 256)] if args.quick else
                         args.shape or [(64, 100, 64), (64, 100, 512)], args.masked, args.rounds)
    if args.shape or args.quick:
        sweep(args.shape or [(64, 100, 256)], [args.masked], args.rounds)
    else:
        sweep(SWEEP, [False, True], args.rounds)
    if not args.no_memory:
        peak_memory(["lstm_tf", "keras"] + (["torch"] if torch is not None else []))


if __name__ == "__main__":
    main()
