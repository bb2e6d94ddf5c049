"""The process on each device: block host, data plane, telemetry (issue 4)."""
