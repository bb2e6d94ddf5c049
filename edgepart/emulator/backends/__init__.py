"""The backends that run a scenario's job; every run ends in the one run record,
``edgepart.controller.result.RunRecord``, that ``simulate``/``emulate --json`` and the report read.

sim: the scenario replayed token by token on a virtual clock with the cost model; no
    process, no weights (``SimResult.record()`` is its record).
local: real agents as processes on this machine, one per device, a broker and the
    controller in this process; CPU shares by cgroup and pacing (``LocalRun``).
docker: every device a resource-limited container, links shaped in the kernel, the
    controller and the emulator driver in containers of their own (``DockerRun``).

Imports: ``controller``, ``llm``, ``control_plane`` and the rest of ``emulator``. A backend
is chosen by the command line (``edgepart.controller.cli``) or a benchmark.
"""
