"""The MQTT control plane every edgepart role shares (agent, controller, emulator driver).

protocol: topics and versioned, validated JSON messages; malformed input becomes a value,
    never an exception.
mqtt: a role's broker credentials and a fresh client per connection attempt.
session: ``BrokerSession``, one role's session with the broker: connect with backoff,
    reconnect after a loss, requests answered by id and sent again after a reconnect,
    malformed messages counted per kind; the timing constants of all of it.

Imports: the standard library, pydantic and aiomqtt only: never ``llm``,
``device_agent``, ``controller`` or ``emulator``, which all build on it (the one-way
order of docs/design.md: ``llm`` <- ``device_agent`` <- ``controller`` <- ``emulator``,
``control_plane`` below ``device_agent`` and ``controller``).
"""
