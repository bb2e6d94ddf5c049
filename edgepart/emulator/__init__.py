"""The emulator: scenarios, the worlds they describe, and the backends that run them.

A scenario (YAML) names a model, devices with their compute and memory, the links between
them and traces that change the world while tokens are generated. A backend runs it:
``sim`` on a virtual clock with the cost model, ``local`` with real agent processes on this
machine, ``docker`` with one resource-limited container per device.

Scenarios and worlds:

scenario: the scenario file's schema, loader and precise errors.
generators: seeded random scenarios after the paper's simulator.
world: the emulated world's resource state and the traces that change it (pure).
live_world: the world of a live run: traces applied to real agents as tokens come.
job: a scenario's job as the controller runs it: model, prompt, ``ControllerConfig``.
backends/: ``sim``, ``local`` and ``docker``.
report: the comparison table and per-token latency plots of live runs.

The hosts and the testbed:

host_limits: cgroups and CPU counts that make a host process behave like a small device.
broker: MQTT brokers to start (amqtt in-process, mosquitto as a subprocess).
driver: the emulator driver: it owns the world while a separate controller decodes.
compose: a scenario rendered into a docker compose project (pure).
testbed_secrets: the testbed broker's identities, passwords, ACL and TLS.
images: the testbed's Docker image, built offline from a wheelhouse.
docker_cli: the one way edgepart talks to Docker (CLI runner, command builders, SDK).
cli: ``edgepart testbed`` (render, up, down, calibrate, secrets, drive, build).
cli_common: what every ``edgepart`` command shares: consoles, options, exits.

Imports: every package below it: ``llm``, ``control_plane`` and ``controller``
(``device_agent`` it starts as a process, never imports). None of them imports the
emulator (the one-way order of docs/design.md: ``llm`` <- ``device_agent`` <-
``controller`` <- ``emulator``) but ``edgepart.controller.cli``, the command line, which wires the
backends and the ``testbed`` sub-app in.
"""
