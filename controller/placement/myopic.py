"""The myopic planner: resource-aware head-level placement with migration on re-plans.

The policy of arXiv 2505.02533 — at every re-plan, choose the placement that
minimises migration delay now plus predicted decode delay until the next re-plan,
under the devices' memory until then — made stronger:

1. Seeds (``seeds``): the exact latency optimum without memory limits (a DP over
   layers), repaired for memory; a resource-aware greedy along the layers; the
   current placement (no migration) and the layer splits (EdgeShard,
   memory-proportional), so the result is never worse than any of them.
2. Local search (``local_search``, scoring with ``scored_placement``) from each seed
   on the exact objective of ``controller.cost``. Small instances add random kicks
   (iterated local search) with a fixed seed, so decisions are deterministic.

This module is the policy: which seeds, how much search each gets, when to kick.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from controller import cost
from controller.placement.base import NoFeasiblePlacement, Placement
from controller.placement.layers import layer_split_candidates
from controller.placement.local_search import MIN_GAIN, improve, repair_memory
from controller.placement.scored_placement import ScoredPlacement
from controller.placement.seeds import chain_optimum, greedy_chain, group_gather_s, sequential_fix
from controller.view import ResourceView
from llm.blocks import BlockTable

__all__ = ["MyopicPlanner"]


@dataclass
class MyopicPlanner:
    """Greedy/DP seeded local search minimising migration + interval decode delay."""

    name: str = "myopic"
    replans: bool = True
    max_rounds: int = 12
    layer_seeds: bool = True
    swaps: bool = True
    #: blocks x devices up to which an instance counts as small: every seed is searched
    small_size: int = 4000
    #: blocks x devices up to which the planner also spends on a quadratic greedy
    #: construction, random kicks and many swaps (tiny instances, where they pay off)
    tiny_size: int = 400
    max_kicks: int = 40
    #: on large instances, repair the memory-blind optimum only if at most this fraction
    #: of the model's bytes overflows (a bigger repair costs more than it tends to gain)
    repair_limit: float = 0.25
    seed: int = 0
    last_objective_s: float = field(default=float("nan"), init=False)

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """Best placement found for the view's planning window (raises NoFeasiblePlacement)."""
        if not view.usable[view.source]:
            raise NoFeasiblePlacement(
                f"source device {view.devices[view.source]} is down or has no resources left: "
                "embedding, LM head and sampling cannot run"
            )
        cur = None if current is None else _alive_current(view, current.assignment)
        starts = [ScoredPlacement(model, view, seed, cur) for seed in self._seeds(view, model, cur)]
        starts = sorted((s for s in starts if s.feasible()), key=ScoredPlacement.objective)
        small = model.size * view.size <= self.small_size
        best: ScoredPlacement | None = None
        for search in starts:
            # on large instances a seed that starts behind the best result so far is skipped:
            # the search time goes to the seeds most likely to win
            if best is not None and not small and search.objective() >= best.objective():
                continue
            improve(search, self.max_rounds, self._swap_budget(model, view))
            if best is None or search.objective() < best.objective() - MIN_GAIN:
                best = search
        if best is not None:
            best = self._kick(best, model, view, cur)
        if best is None:
            raise NoFeasiblePlacement(
                f"no placement of {model.spec.name} fits the devices' memory up to context "
                f"{view.window.interval_end_context}"
            )
        self.last_objective_s = best.objective()
        return Placement(best.x.copy())

    def _swap_budget(self, model: BlockTable, view: ResourceView) -> int:
        """How many swaps one local search may score: generous on small instances only."""
        if not self.swaps:
            return 0
        size = model.size * view.size
        return max(50, 200 * self.tiny_size // size) if size <= self.tiny_size else 16

    def _kick(
        self, best: ScoredPlacement, model: BlockTable, view: ResourceView, cur: np.ndarray | None
    ) -> ScoredPlacement:
        """Iterated local search on tiny instances, keeping what improves.

        First kicks (a few random moves and swaps of the best placement so far), then
        half as many restarts (the greedy construction from a random tentative
        placement), each followed by the local search; the random streams are seeded,
        so a decision is reproducible.
        """
        size = model.size * view.size
        kicks = min(self.max_kicks, 10 * self.tiny_size // size) if size <= self.tiny_size else 0
        rng = np.random.default_rng(self.seed)
        restarts = np.random.default_rng(self.seed + 1)
        usable = np.nonzero(view.usable)[0]
        for turn in range(kicks + kicks // 2):
            if turn >= kicks:
                start = sequential_fix(model, view, restarts.choice(usable, model.size), cur)
                if start is None:
                    continue
                trial = ScoredPlacement(model, view, start, cur)
            else:
                trial = ScoredPlacement(model, view, best.x, cur)
                for _ in range(int(rng.integers(2, 5))):
                    b = int(rng.integers(model.size))
                    if rng.random() < 0.5:
                        targets = np.array([int(rng.choice(usable))])
                        blocks = np.array([b])
                    else:
                        other = int(rng.integers(model.size))
                        blocks = np.array([b, other])
                        targets = trial.x[[other, b]]
                    if np.isfinite(trial.score(blocks, targets[None, :])[0]):
                        trial.apply(blocks, targets)
            if not trial.feasible():
                continue
            improve(trial, self.max_rounds, self._swap_budget(model, view))
            if trial.objective() < best.objective() - MIN_GAIN:
                best = trial
        return best

    def _seeds(
        self, view: ResourceView, model: BlockTable, cur: np.ndarray | None
    ) -> Iterable[np.ndarray]:
        small = model.size * view.size <= self.small_size
        if cur is not None and (cur >= 0).all():
            yield cur.copy()
        free = group_gather_s(
            model,
            view,
            view.window.mean_context,
            np.arange(view.size),
            np.full(view.size, model.groups),
        )
        chain = chain_optimum(model, view, cur, free)
        greedy = greedy_chain(model, view, cur, free[0].min(axis=1))
        if greedy is not None:
            yield greedy
        if small or _overflow_fraction(model, view, chain) <= self.repair_limit:
            repaired = repair_memory(model, view, chain, cur)
            if repaired is not None:
                yield repaired
        if cur is not None and not (cur >= 0).all():
            patched = np.where(cur >= 0, cur, chain)
            repaired = repair_memory(model, view, patched, cur)
            if repaired is not None:
                yield repaired
        if model.size * view.size <= self.tiny_size:
            fixed = sequential_fix(model, view, chain, cur)
            if fixed is not None:
                yield fixed
        if self.layer_seeds:
            for placement in layer_split_candidates(view, model):
                yield placement.assignment.copy()


def _overflow_fraction(table: BlockTable, view: ResourceView, x: np.ndarray) -> float:
    """Bytes over the devices' memory as a fraction of all block bytes."""
    n = view.window.interval_end_context
    over = cost.memory_use(table, view, x, n) - view.memory_bytes
    return float(np.clip(over, 0, None).sum() / table.memory_bytes(n).sum())


def _alive_current(view: ResourceView, current: np.ndarray) -> np.ndarray:
    """The current assignment with blocks on dead devices marked -1 (their state is lost)."""
    cur = np.asarray(current, dtype=np.int64).copy()
    cur[(cur >= 0) & ~view.alive[np.clip(cur, 0, None)]] = -1
    return cur
