"""The process on each device: it holds blocks, runs them per token and moves them on command.

One agent per emulated device (``python -m edgepart.device_agent`` or ``edgepart agent``). The
controller speaks to it over MQTT (``control_plane``); agents send each other hidden
states over their own TCP data plane.

The agent and its command line:

agent: ``Agent``: its broker session, and commands, placements and frames dispatched to
    the device's parts below.
__main__: the command line of one agent.
epochs: the placement epochs the agent knows: who holds which block, routes, endpoints.
program: what one device does for one token under a placement (pure).
runner: runs this device's part of each token, the program its epoch gives it.
blocks: the blocks the device holds under its memory budget, and how they come and go.

The data plane and its links:

dataplane: one listening TCP port, one shaped outbound stream per peer.
wire: the data plane's length-prefixed binary frames (never pickle).
links: this device's links shaped on the controller's command, per peer.
shaping: link shaping in the sender: a token bucket for bandwidth, a per-frame latency.
tc: kernel link shaping of the agent's own interface (htb per peer, via pyroute2).

The emulated device:

pacing: this host's CPU made to run at the device's speed.
burners: background CPU load: child processes burning a fraction of the cores.
ballast: memory another application takes: resident bytes in a child process.
telemetry: what the agent measures besides its blocks and links (CPU use, probes).
metrics: the agent's Prometheus metrics.

Imports: ``llm`` and ``control_plane`` only, never ``controller`` or ``emulator``
(the one-way order of docs/design.md: ``llm`` <- ``device_agent`` <- ``controller`` <-
``emulator``).
"""
