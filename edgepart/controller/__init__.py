"""The controller: it plans where each block runs, moves blocks between agents, drives decoding.

Pure core (no I/O):

view: ``ResourceView``, the resources a planner decides on: devices, links, the window.
cost: the cost model: per-token delay, migration delay and memory of placements.
placement/: the planners, one module each behind ``place(view, model, current)``.
replan: when a planner runs again (shared by the simulator and the live controller).
payback: whether a switch pays: its gain over the change's lifetime against its stall.
switch: how a switch is carried out: the moves in waves that fit.
config: ``ControllerConfig``, what a live controller runs: devices, block table, job.
result: the one record of a run, whatever backend ran it.

The live controller (I/O at the rim):

orchestrator: ``Controller``: the token loop: plans from telemetry, switches, decodes.
agent_link: the controller's line to its agents: its broker session and their reports.
telemetry_view: the devices as their agents report them, and the view planned on.
deployment: the placement as the agents hold it: epochs published, blocks moved.
world_link: the controller's side of an emulator driver in another process or container.
metrics: the controller's Prometheus metrics.
cli: the ``edgepart`` command line.

Imports: ``llm``, ``control_plane`` and ``device_agent`` (only its metrics server), never
``emulator``: the emulator builds on the controller (the one-way order of
docs/design.md: ``llm`` <- ``device_agent`` <- ``controller`` <- ``emulator``). Only
``cli``, the command line of every role, imports across: it wires in the emulator's
backends and its ``testbed`` sub-app.
"""
