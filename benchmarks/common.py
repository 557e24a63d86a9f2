"""
What every benchmark script shares: the machine and library versions a figure came from, interleaved
timing with medians, and the one RATIO line each script ends with.

    python benchmarks/common.py          # prints this machine's description

A ratio of two speeds is only honest when both sides ran under the same conditions. On a shared or
thermally throttled machine the load drifts by 2-5x within minutes, so the scripts never time side A
and then side B: they alternate A, B, A, B ... in one process and report the medians.
"""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

# every benchmark imports this first: the checkout's modules (model, train, ...) are not installed
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def machine_lines():
    """Lines describing the hardware and software, so a figure can be traced to where it was made."""
    import numpy as np
    import torch
    from homegpt.runtime import cpu_has_bf16, cpu_model
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = cores
    lines = [f"machine: {cpu_model()}, {usable} usable of {cores} logical cores, torch threads {torch.get_num_threads()}, "
             f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_bf16()}"]
    if torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name(0)}")
    lines.append(f"versions: python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
                 f"{platform.system()} {platform.release()}")
    if hasattr(os, "getloadavg"):
        # another job on the machine slows both sides alike only because they are interleaved; say so
        lines.append("load average at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    return lines


def print_machine(title):
    print(f"== {title}")
    for line in machine_lines():
        print(line)
    sys.stdout.flush()


def interleaved(sides, repeats, warmup=1):
    """Run each callable of {name: fn} in turn, `warmup` untimed rounds then `repeats` timed ones.

    Returns {name: [seconds, ...]}. fn must finish its work before returning (call .item() or similar
    on the result) so the time covers the computation and not just its queueing.
    """
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs)


def print_ratio(name, fast_label, fast, base_label, base, unit, target=None):
    """The line a reader (and the tests) look for: 'RATIO <name>: 2.31x (...)', bigger is better.

    fast and base are rates (higher is better) in `unit`; target is the ratio the README promises.
    """
    ratio = fast / base if base > 0 else float("inf")
    verdict = ""
    if target is not None:
        verdict = f"; target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}"
    print(f"RATIO {name}: {ratio:.2f}x ({fast_label} {fast:,.1f} {unit} vs {base_label} {base:,.1f} {unit}{verdict})",
          flush=True)
    return ratio


if __name__ == "__main__":
    print_machine("this machine")
