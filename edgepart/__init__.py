"""edgepart: head-level partitioning of decoder LLMs across edge devices.

Subpackages, each depending only on those before it:

- ``edgepart.llm``: the model, its blocks (attention heads with their KV caches, FFN,
  embedding, head) and their analytic costs, torch execution;
- ``edgepart.control_plane``: the MQTT contract and the one broker session every role uses;
- ``edgepart.device_agent``: the process on each device;
- ``edgepart.controller``: resource view, cost model, planners, re-planning, the live
  controller and the command line;
- ``edgepart.emulator``: scenarios, the sim/local/docker backends and the Docker testbed.
"""
