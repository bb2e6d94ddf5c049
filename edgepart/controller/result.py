"""The one record of a run, whatever ran it: the controller's measurements and the backend's.

- ``RunResult``: what a generation measured, token by token (``TokenRecord``), switch by
  switch (``SwitchRecord``), with its recoveries and broker losses; ``summary()`` is the
  JSON a controller announces (``run/result``) and ``from_summary`` reads it back.
- ``ControllerError``: a live run that stopped, with the result up to then (``partial``).
- ``RunRecord``: one run of a scenario under one algorithm on a backend (``sim``,
  ``local``, ``docker``): the result plus how it ran (text, telemetry, isolation, CPU
  shares). ``to_json()`` is the object ``simulate --json`` and ``emulate --json`` print
  (the keys of docs/design.md) and the report (``edgepart.emulator.report``) reads the same fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

#: the ``simulate --json`` keys of docs/design.md, exactly (``emulate --json`` prints more)
SIM_KEYS = (
    "algorithm", "backend", "per_token_s", "total_s", "migrations", "migration_s",
    "peak_memory_bytes", "replans",
)  # fmt: skip


@dataclass
class TokenRecord:
    """One generated token: its id, measured and predicted latency (s), context after it."""

    token_id: int
    measured_s: float
    predicted_s: float
    context: int
    epoch: int


@dataclass(frozen=True)
class SwitchRecord:
    """One carried-out switch: when it committed, the blocks it moved, whether memory or a
    failure forced it, and each phase predicted beside measured (s): the prepare (in the
    background, from the first prepare sent to the last built) and the commit (the stall)."""

    token: int
    blocks: int
    forced: bool
    predicted_prepare_s: float
    prepare_s: float
    predicted_commit_s: float
    commit_s: float


@dataclass
class RunResult:
    """What a generation measured (the emulate keys of docs/design.md via ``summary``)."""

    algorithm: str
    output_token_ids: list[int] = field(default_factory=list)
    tokens: list[TokenRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    migrations: int = 0
    migration_s: float = 0.0
    migration_bytes: float = 0.0
    replans: int = 0
    replan_s: list[float] = field(default_factory=list)
    failed_replans: int = 0
    peak_memory_bytes: dict[str, float] = field(default_factory=dict)
    recoveries: int = 0
    recovery_s: float = 0.0
    #: per device, the time to build one block of each kind at its nominal speed (s)
    install_s: dict[str, dict[str, float]] = field(default_factory=dict)
    #: everything between two tokens that is not decoding (s): commits, re-plans that held
    #: the token loop, recoveries, epochs published; the emulator's own turns excluded
    stall_s: float = 0.0
    #: per device, the (send, receive) software time per hop it planned with last (s)
    hop_overhead_s: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: per link "a->b", the measured one-way latency it planned with last (s)
    latency_s: dict[str, float] = field(default_factory=dict)
    #: every switch between placements, predicted beside measured
    switches: list[SwitchRecord] = field(default_factory=list)
    broker_losses: int = 0  # times the controller lost the broker and reconnected
    #: per device failure the emulator caused, the time (s) until the controller saw it
    detection_s: list[float] = field(default_factory=list)
    reprefill_s: float = 0.0  # of recovery_s, the time re-running the history took (s)
    control_overhead_s: float = 0.0  # median control round trip per token (s)
    #: the world ran this many times slower than the scenario (every time above is in
    #: scenario time: wall / time_dilation)
    time_dilation: float = 1.0
    wall_s: float = 0.0  # the run's wall-clock time (s), not dilated
    failure: str | None = None

    @property
    def per_token_s(self) -> list[float]:
        """Measured decode latency per token after the first (s)."""
        return [t.measured_s for t in self.tokens]

    @property
    def predicted_per_token_s(self) -> list[float]:
        """The cost model's prediction for the same tokens, placements and state (s)."""
        return [t.predicted_s for t in self.tokens]

    @property
    def total_s(self) -> float:
        """Decode time plus every stall between tokens (s), as the simulator counts it."""
        return float(sum(self.per_token_s) + self.stall_s)

    @classmethod
    def from_summary(cls, data: dict) -> RunResult:
        """A result back from its ``summary`` (e.g. sent by a controller in a container)."""
        tokens = [
            TokenRecord(token_id, measured, predicted, 0, 0)
            for token_id, measured, predicted in zip(
                data["output_token_ids"][1:],
                data["per_token_s"],
                data["predicted_per_token_s"],
                strict=False,
            )
        ]
        fields = {
            "algorithm", "output_token_ids", "prefill_s", "migrations", "migration_s",
            "migration_bytes", "replans", "failed_replans", "peak_memory_bytes", "recoveries",
            "recovery_s", "install_s", "wall_s", "latency_s", "broker_losses",
            "detection_s", "reprefill_s", "control_overhead_s", "stall_s", "replan_s",
            "time_dilation",
        }  # fmt: skip
        kept = {k: v for k, v in data.items() if k in fields}
        overheads = {d: tuple(v) for d, v in data.get("hop_overhead_s", {}).items()}
        switches = [SwitchRecord(**s) for s in data.get("switches", [])]
        return cls(**kept, tokens=tokens, hop_overhead_s=overheads, switches=switches)

    def summary(self) -> dict:
        """The emulate JSON keys (docs/design.md) a live run measures (the backend adds text
        and setup)."""
        return {
            "algorithm": self.algorithm,
            "per_token_s": self.per_token_s,
            "predicted_per_token_s": self.predicted_per_token_s,
            "total_s": self.total_s,
            "migrations": self.migrations,
            "migration_s": self.migration_s,
            "migration_bytes": self.migration_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "replans": self.replans,
            "failed_replans": self.failed_replans,
            "prefill_s": self.prefill_s,
            "recoveries": self.recoveries,
            "recovery_s": self.recovery_s,
            "install_s": self.install_s,
            "stall_s": self.stall_s,
            "replan_s": self.replan_s,
            "time_dilation": self.time_dilation,
            "hop_overhead_s": {d: list(v) for d, v in self.hop_overhead_s.items()},
            "latency_s": self.latency_s,
            "switches": [asdict(s) for s in self.switches],
            "broker_losses": self.broker_losses,
            "detection_s": self.detection_s,
            "reprefill_s": self.reprefill_s,
            "control_overhead_s": self.control_overhead_s,
            "output_token_ids": self.output_token_ids,
            "wall_s": self.wall_s,
        }


@dataclass
class RunRecord:
    """One run of a scenario under one algorithm: the result and how the backend ran it."""

    result: RunResult
    backend: str  # "sim", "local" or "docker"
    text: str = ""  # the generated text (live backends)
    telemetry: str = "measured"  # what the planner saw: "measured" or "configured"
    isolation: str = ""  # how a device's speed was enforced (live backends)
    shares: dict[str, float] = field(default_factory=dict)  # CPU share per device (cores)
    start_s: float | None = None  # from the testbed's start to every device up (s)

    def to_json(self) -> dict:
        """The CLI's ``simulate --json`` / ``emulate --json`` object (keys: docs/design.md)."""
        if self.backend == "sim":  # the cost model's run: the simulate keys, exactly
            data = {**self.result.summary(), "backend": self.backend}
            return {key: data[key] for key in SIM_KEYS}
        data = {
            **self.result.summary(),
            "backend": self.backend,
            "text": self.text,
            "telemetry": self.telemetry,
            "isolation": self.isolation,
            "cpu_share": self.shares,
        }
        if self.start_s is not None:
            data["start_s"] = self.start_s
        return data


class ControllerError(RuntimeError):
    """The live run cannot go on (an agent refused, failed or vanished).

    ``partial`` holds what the run measured and generated until it stopped (set when the
    generation itself stops; None before it began)."""

    partial: RunResult | None = None
    partial_text: str = ""  # the partial output decoded (where a tokenizer was at hand)
