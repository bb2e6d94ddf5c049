"""The benchmarks: one module per measured claim, each run as ``python -m benchmarks.NAME``.

placement_quality: myopic against the exact MILP (small) and the baselines (large).
placement_speed: how long myopic and the MILP take to decide.
block_calibration: effective GFLOP/s of each block type on this CPU.
engine_overhead: per-token decode time of block-wise execution against transformers.
memory_footprint: peak RSS of a process holding a quarter of the blocks against all.
runtime_overhead: data-plane hop latency, per-token control cost, scaling over devices.
emulation_fidelity: live local runs against the cost model, and shaped-link goodput.
chaos: rounds of device kills, broker restarts and link collapses during generation.
testbed_fidelity/: the Docker testbed's links, CPU shares, per-token fidelity and
    capacity (a package: one module per part).
common: what they share: arguments and their defaults per mode (``--quick`` or not), the
    load average, statistics, tables, JSON and plots.

Every benchmark prints rich tables and writes ``DIR/<name>.json`` (``--out DIR``, default
``out``); each module's docstring says what it measures, how, and its targets.

Imports: every package of the repository (``llm``, ``control_plane``, ``device_agent``,
``controller``, ``emulator``); nothing imports the benchmarks but the tests.
"""
