"""The block-timing program of part 2: runs in a CPU-limited container, prints one result.

``compute.run_compute`` ships it into the container as ``docker run ... --entrypoint python
<image> -c <this file's text> <settings JSON>`` (the image has ``llm``, not the
benchmarks). With one torch thread it opens the model (float32, every block in one
process) and times its blocks two ways: ``edgepart.llm.calibration.measure_gflops`` (the host
profile's short passes) and passes of the FFN and KV-group blocks run back to back for
``seconds`` (s), with the cgroup's ``cpu.stat`` before and after. It prints one line
``RESULT <JSON>``.

Settings (JSON): model, contexts, warmup, reps, seconds (s per sustained run) and
sustain_context (the KV groups' context in the sustained run).
"""

import json
import os
import statistics
import sys
import time

import torch


def read(path):
    """A cgroup file's text, stripped (None when it cannot be read)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_stat():
    """The cgroup's cpu.stat counters (v1 or v2; empty when there is none)."""
    for path in ("/sys/fs/cgroup/cpu/cpu.stat", "/sys/fs/cgroup/cpu.stat"):
        text = read(path)
        if text:
            return {k: int(v) for k, v in (line.split() for line in text.splitlines())}
    return {}


def cpu_limits():
    """The container's CFS quota and period as the cgroup (v1 or v2) shows them."""
    return {
        "v1_quota_us": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        "v1_period_us": read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
        "v2_cpu_max": read("/sys/fs/cgroup/cpu.max"),
    }


def sustained(run_pass, blocks_per_pass, flops_per_block, seconds):
    """Passes back to back for `seconds` after two warm-up passes: time per block and more."""
    for _ in range(2):
        run_pass()
    before, cpu0, passes = cpu_stat(), time.thread_time(), []
    t0 = time.perf_counter()
    while True:
        s = time.perf_counter()
        run_pass()
        e = time.perf_counter()
        passes.append(e - s)
        if e - t0 >= seconds:
            break
    wall, cpu, after = e - t0, time.thread_time() - cpu0, cpu_stat()
    blocks_run = len(passes) * blocks_per_pass
    ordered = sorted(passes)
    return {
        "passes": len(passes), "blocks": blocks_run, "wall_s": wall, "cpu_s": cpu,
        "block_s": wall / blocks_run, "gflops": blocks_run * flops_per_block / wall / 1e9,
        "pass_median_s": statistics.median(passes),
        "pass_p90_s": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "pass_max_s": ordered[-1], "pass_min_s": ordered[0],
        "cpu_stat_delta": {k: after[k] - before.get(k, 0) for k in after},
    }  # fmt: skip


def main() -> None:
    """Time the blocks with the settings in argv[1]; print ``RESULT <JSON>``."""
    cfg = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    from edgepart.llm.blocks import ffn_flops, group_flops
    from edgepart.llm.calibration import measure_gflops
    from edgepart.llm.loader import open_model
    from edgepart.llm.runtime import monolithic
    from edgepart.llm.torch_blocks import FFNBlock, KVGroupBlock

    limits = cpu_limits()
    t0 = time.perf_counter()
    om = open_model(cfg["model"])
    model = monolithic(om.source, om.arch, torch.float32)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = measure_gflops(model, cfg["contexts"], cfg["warmup"], cfg["reps"])
    measure_s = time.perf_counter() - t0
    per_pass = {
        "ffn_block_s": measured["blocks"]["ffn"]["block_s"],
        "group_block_s": {n: e["block_s"] for n, e in measured["blocks"]["group"].items()},
        "ffn_pass_s": measured["blocks"]["ffn"]["pass_s"],
    }
    spec = model.arch.spec
    blocks = next(iter(model.hosts.values())).blocks
    ffns = [b for b in blocks.values() if isinstance(b, FFNBlock)]
    groups = [b for b in blocks.values() if isinstance(b, KVGroupBlock)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.d_model, generator=gen)
    n = cfg["sustain_context"]
    for b in groups:
        b.set_cache(torch.randn(n - 1, b.head_dim, generator=gen),
                    torch.randn(n - 1, b.head_dim, generator=gen))  # fmt: skip
    model.length = n - 1

    def ffn_pass():
        for b in ffns:
            b(x)

    def group_pass():
        for b in groups:
            b(x)
            b.length -= 1  # the cache rolled back: every pass attends over n

    with torch.no_grad():
        ffn = sustained(ffn_pass, len(ffns), ffn_flops(spec), cfg["seconds"])
        group = sustained(group_pass, len(groups), group_flops(spec, n), cfg["seconds"])
    print("RESULT " + json.dumps({
        "limits": limits, "load_s": load_s, "measure_s": measure_s, "per_pass": per_pass,
        "gflops": {k: measured[k] for k in ("group", "proj", "ffn", "head")},
        "sustained": {"ffn": ffn, "group": group}, "nproc": os.cpu_count(),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
