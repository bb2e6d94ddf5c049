"""edgepart: head-level partitioning of decoder LLMs across edge devices.

Subpackages, each depending only on those before it:

- ``edgepart.llm``: the model, its blocks (attention heads with their KV caches, FFN,
  embedding, head) and their analytic costs, torch execution;
- ``edgepart.control_plane``: the MQTT contract and the one broker session every role uses;
- ``edgepart.device_agent``: the process on each device;
- ``edgepart.controller``: resource view, cost model, planners, re-planning, the live
  controller and the command line;
- ``edgepart.emulator``: scenarios, the sim/local/docker backends and the Docker testbed.

``edgepart.api`` (its functions also importable from here: ``edgepart.simulate`` ...) is the
Python interface: load a scenario, plan, simulate, emulate, sweep, results as DataFrames.
"""

from __future__ import annotations

from typing import Any

#: ``edgepart.api``'s functions, importable from the package (loaded on first use, so that
#: ``import edgepart`` costs nothing and no subpackage imports its dependents)
_API = frozenset(
    {"PlanRecord", "emulate", "load_scenario", "plan", "run_row", "simulate", "sweep",
     "to_dataframe"}
)  # fmt: skip

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        from edgepart import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgepart' has no attribute {name!r}")
