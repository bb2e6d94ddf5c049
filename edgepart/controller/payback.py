"""Whether a switch pays: the gain it buys over how long the change lasts, against its stall.

A switch is two phases (docs/design.md, migration). Prepare builds the incoming blocks' weights on
their targets in the background while tokens still run on the current placement, so it
costs no stall, but the new placement helps only once it is done. Commit, at a token
boundary, sends the moved KV caches and switches the epoch: that is the stall. A switch
is worth it when what it saves over the horizon outweighs its stall by a margin:

    gain = (horizon - prepare tokens) x (current token s - new token s)
    cost = commit s + (commit s of moving back, when the change is expected to end first)
    switch  iff  gain >= alpha x cost  and  the new token is faster by MIN_RELATIVE_GAIN

The horizon is the tokens left, cut to how long changes have lasted so far
(``ChangeHistory``): a load that lasts 8 tokens must not be treated as permanent. alpha
starts above 1 and follows the measured / predicted ratio of the switches carried out
(``SwitchCalibration``), so a model that under-prices switches on this host asks for
more. Pure: numbers in, decisions out; the simulator and the live controller share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ChangeHistory",
    "SwitchCalibration",
    "SwitchEstimate",
    "worth_switching",
]

#: relative change of a device's GFLOP/s or a link's Mbit/s that starts a new episode
CHANGE_THRESHOLD = 0.2
#: re-plan intervals a change is expected to last before any change was seen to end
DEFAULT_PERSISTENCE_INTERVALS = 3
#: the new placement must be faster per token by this fraction: measured speeds and
#: latencies jitter by about as much, and a switch that chases the jitter pays a real
#: stall for an imagined gain
MIN_RELATIVE_GAIN = 0.03
#: alpha before any switch was measured, and its bounds: a switch stalled by a busy host
#: must not make every later switch look free or ruinous
ALPHA_PRIOR = 1.5
ALPHA_BOUNDS = (1.0, 4.0)
#: switches whose measured / predicted ratios set alpha (the most recent)
CALIBRATION_WINDOW = 8


@dataclass(frozen=True)
class SwitchEstimate:
    """A candidate switch as the cost model sees it (s, tokens)."""

    current_token_s: float  # per-token delay of the current placement
    new_token_s: float  # per-token delay of the candidate
    prepare_s: float  # until every target has built its incoming blocks (background)
    commit_s: float  # stall at the token boundary: KV bytes per link + control round trip
    horizon_tokens: int  # tokens the change is expected to last (at most those left)
    tokens_left: int  # tokens still to generate
    waves: int = 1  # commits one after another, each at its own token boundary

    @property
    def prepare_tokens(self) -> int:
        """Tokens that still run on the current placement while the targets prepare: at
        least one per wave (a wave prepares while a token runs and commits at the boundary
        after it)."""
        per_wave = self.waves
        if self.prepare_s <= 0:
            return per_wave
        if not math.isfinite(self.current_token_s) or self.current_token_s <= 0:
            return per_wave
        return max(per_wave, math.ceil(self.prepare_s / self.current_token_s))

    @property
    def gain_s(self) -> float:
        """Decode time the switch saves over the horizon (s); inf when the current
        placement cannot run at all (a dead device, memory exceeded)."""
        if not math.isfinite(self.current_token_s):
            return math.inf
        useful = max(0, self.horizon_tokens - self.prepare_tokens)
        return useful * (self.current_token_s - self.new_token_s)

    @property
    def ends_early(self) -> bool:
        """Whether the change is expected to end before the generation does."""
        return self.horizon_tokens < self.tokens_left

    @property
    def cost_s(self) -> float:
        """The stall of the switch, plus that of moving back when the change ends first."""
        return self.commit_s * (2.0 if self.ends_early else 1.0)


def worth_switching(estimate: SwitchEstimate, alpha: float) -> bool:
    """Whether the gain over the horizon is at least alpha x the switch's cost."""
    if not math.isfinite(estimate.new_token_s) or not math.isfinite(estimate.cost_s):
        return False
    if not math.isfinite(estimate.current_token_s):
        return True  # the current placement cannot go on: any runnable one is better
    relative = 1.0 - estimate.new_token_s / estimate.current_token_s
    if relative < MIN_RELATIVE_GAIN:
        return False
    return estimate.gain_s >= alpha * estimate.cost_s


@dataclass
class SwitchCalibration:
    """alpha from the measured / predicted stall of the switches carried out."""

    ratios: list[float] = field(default_factory=list)

    def record(self, predicted_s: float, measured_s: float) -> None:
        """One carried-out switch (s); ignored when nothing was predicted."""
        if predicted_s > 0 and measured_s >= 0:
            self.ratios.append(measured_s / predicted_s)

    @property
    def alpha(self) -> float:
        """The margin a switch's gain must have over its predicted cost."""
        recent = self.ratios[-CALIBRATION_WINDOW:]
        if not recent:
            return ALPHA_PRIOR
        # at least 1: a switch is never taken on a predicted gain below its cost
        return float(np.clip(max(1.0, float(np.median(recent))), *ALPHA_BOUNDS))


@dataclass
class ChangeHistory:
    """How long changes of the world have lasted, from the resources seen at each token.

    Every device's available GFLOP/s and every link's Mbit/s has a level; a value that
    moves from its level by CHANGE_THRESHOLD (relative) ends the resource's episode and
    starts a new one at the new value. ``expected_persistence`` is the median length of
    the episodes that ended (tokens), or the default before any did, and never less than
    the age of the episode now running (a state that has lasted t tokens is expected to
    last about as long again).
    """

    levels: np.ndarray | None = None  # the level of every resource (flattened)
    started: np.ndarray | None = None  # the token each level began at
    lengths: list[int] = field(default_factory=list)  # tokens of the episodes that ended
    last_change: int = 0  # the token of the newest change seen

    def observe(self, token: int, compute_gflops: np.ndarray, bandwidth_mbit: np.ndarray) -> bool:
        """Resources as seen before generated token ``token``; whether something changed."""
        values = np.concatenate([np.ravel(compute_gflops), np.ravel(bandwidth_mbit)])
        values = np.nan_to_num(values.astype(float), posinf=0.0)
        if self.levels is None or self.levels.shape != values.shape:
            self.levels, self.started = values.copy(), np.full(values.shape, -1)
            return False
        assert self.started is not None
        with np.errstate(divide="ignore", invalid="ignore"):
            moved = np.abs(values - self.levels) / np.abs(self.levels)
        moved = np.where(self.levels == 0, values != 0, moved >= CHANGE_THRESHOLD)
        if not moved.any():
            return False
        # only episodes that began with a change count: the state the run started in says
        # nothing about how long a change lasts (its start was not a change)
        self.lengths.extend(int(token - s) for s in self.started[moved] if 0 <= s < token)
        self.levels[moved] = values[moved]
        self.started[moved] = token
        self.last_change = token
        return True

    def rebase(self, token: int, compute_gflops: np.ndarray, bandwidth_mbit: np.ndarray) -> None:
        """Take the resources seen now as the levels without counting a change: right after
        start-up or a switch the first measurements move by more than the threshold while
        nothing changed in the world."""
        values = np.concatenate([np.ravel(compute_gflops), np.ravel(bandwidth_mbit)])
        values = np.nan_to_num(values.astype(float), posinf=0.0)
        if self.levels is None or self.levels.shape != values.shape:
            self.levels, self.started = values.copy(), np.full(values.shape, -1)
        self.levels = values.copy()

    def expected_persistence(self, token: int, default_tokens: int) -> int:
        """Tokens the state seen at ``token`` is expected to last (at least 1)."""
        typical = int(np.median(self.lengths)) if self.lengths else default_tokens
        age = token - self.last_change
        return max(1, typical, age)
