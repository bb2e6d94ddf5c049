"""The myopic planner: resource-aware head-level placement with migration on re-plans.

The policy of arXiv 2505.02533 — at every re-plan, choose the placement that
minimises migration delay now plus predicted decode delay over the horizon,
under the devices' memory until its end — made stronger:

1. Seeds (``seeds``): the exact latency optimum without memory limits (a DP over
   layers), repaired for memory; a resource-aware greedy along the layers; the
   current placement (no migration), or a repair of it when it no longer fits, and the
   layer splits (EdgeShard, memory-proportional), so the result is never worse than any
   of them.
2. Local search (``local_search``, scoring with ``scored_placement``) from each seed
   on the exact objective of ``edgepart.controller.cost``.
3. Tiny instances: the exact MILP (``optimal``), warm-started with the local search's
   result, under a node budget; where it does not prove the optimum, random kicks
   (iterated local search) with a fixed seed, so decisions are deterministic.
4. A forced re-plan (blocks lost, or memory no longer holds) relocates the fewest bytes
   among the placements within ``forced.FORCED_SLACK`` of the best (``forced``).

This module is the policy: which seeds, how much search each gets, when to kick, when
the exact solver decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from edgepart.controller import cost
from edgepart.controller.placement.base import NoFeasiblePlacement, Placement
from edgepart.controller.placement.forced import (
    FORCED_SLACK,
    alive_current,
    is_forced,
    least_relocation,
)
from edgepart.controller.placement.layers import layer_split_candidates
from edgepart.controller.placement.local_search import MIN_GAIN, improve, repair_memory
from edgepart.controller.placement.optimal import solve, solve_least_moves
from edgepart.controller.placement.scored_placement import ScoredPlacement
from edgepart.controller.placement.seeds import (
    chain_optimum,
    greedy_chain,
    group_gather_s,
    sequential_fix,
)
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

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
    #: construction, random kicks and many swaps (tiny instances, where they pay off), and
    #: up to which the memory-blind optimum is always repaired into a seed
    tiny_size: int = 400
    max_kicks: int = 40
    #: on larger instances, repair the memory-blind optimum only if at most this fraction
    #: of the model's bytes overflows (a bigger repair costs more than it tends to gain:
    #: on memory-tight instances it never won, and it cost a third of the decision)
    repair_limit: float = 0.25
    #: tiny instances go to the exact MILP, warm-started with the local search's result;
    #: its kicks run only where HiGHS does not prove the optimum within exact_nodes.
    #: Measured (benchmarks/placement_speed.py, tight part, 3-6 devices): on 20 blocks the
    #: kicks that close the heuristic's last gaps (up to 14 % without them) took 0.5 s in
    #: the median where HiGHS proves the optimum in 0.19 s (this portfolio: 0.14-0.18 s);
    #: on 150 blocks HiGHS finds no optimum in 10 s while the heuristic takes 30-40 ms.
    exact: bool = True
    #: branch-and-bound nodes the MILP may use: a budget independent of the machine's
    #: load, so that a decision stays reproducible (tiny instances needed at most ~150)
    exact_nodes: int = 200
    #: a safety net only: on an idle host the node budget runs out long before
    exact_time_limit_s: float = 2.0
    seed: int = 0
    last_objective_s: float = field(default=float("nan"), init=False)

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """Best placement found for the view's planning window (raises NoFeasiblePlacement).

        A forced re-plan (the current placement lost blocks or no longer fits) returns the
        placement relocating the fewest bytes within FORCED_SLACK of the best objective.
        """
        if not view.usable[view.source]:
            raise NoFeasiblePlacement(
                f"source device {view.devices[view.source]} is down or has no resources left: "
                "embedding, LM head and sampling cannot run"
            )
        cur = None if current is None else alive_current(view, current.assignment)
        forced = is_forced(model, view, cur)
        everywhere = np.arange(view.size)
        free = group_gather_s(
            model, view, view.window.mean_context, everywhere, np.full(view.size, model.groups)
        )
        chain = chain_optimum(model, view, cur, free)
        seeds = self._seeds(view, model, cur, chain, free[0])
        best, candidates = self._search(view, model, cur, seeds, keep_starts=forced)
        best, proven = self._finish(view, model, cur, best, chain)
        if best is None:
            raise NoFeasiblePlacement(
                f"no placement of {model.spec.name} fits the devices' memory up to context "
                f"{view.window.interval_end_context}"
            )
        if forced:
            assert cur is not None
            exact = proven and self.exact and model.size * view.size <= self.tiny_size
            best = self._least_relocation(view, model, cur, best, candidates, exact)
        self.last_objective_s = best.objective()
        return Placement(best.x.copy())

    def _finish(
        self,
        view: ResourceView,
        model: BlockTable,
        cur: np.ndarray | None,
        best: ScoredPlacement | None,
        chain: np.ndarray,
    ) -> tuple[ScoredPlacement | None, bool]:
        """After the local search, on tiny instances: the exact solver, else the kicks.

        Returns the best placement and whether it is proven optimal. Nothing more is spent
        when the search's result already decodes as fast as the memory-free optimum.
        """
        if best is not None and _at_latency_bound(best, model, view, chain):
            return best, True
        if model.size * view.size > self.tiny_size:
            return best, False
        exact = self._exact(view, model, cur, best) if self.exact else None
        if exact is not None:
            if best is None or exact.objective() < best.objective() - MIN_GAIN:
                best = exact
            return best, True
        return (None if best is None else self._kick(best, model, view, cur)), False

    def _search(
        self,
        view: ResourceView,
        model: BlockTable,
        cur: np.ndarray | None,
        seeds: Iterable[np.ndarray],
        keep_starts: bool,
    ) -> tuple[ScoredPlacement | None, list[ScoredPlacement]]:
        """Local search from every seed: the best result, and every start and result.

        The starts are copied before their search only when keep_starts (a forced
        re-plan picks among them by bytes relocated).
        """
        starts = [ScoredPlacement(model, view, seed, cur) for seed in seeds]
        starts = sorted((s for s in starts if s.feasible()), key=ScoredPlacement.objective)
        kept = [ScoredPlacement(model, view, s.x, cur) for s in starts] if keep_starts else []
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
        return best, kept + starts

    def _exact(
        self,
        view: ResourceView,
        model: BlockTable,
        cur: np.ndarray | None,
        best: ScoredPlacement | None,
    ) -> ScoredPlacement | None:
        """The MILP's optimum when HiGHS proves it within the node budget, else None."""
        try:
            result = solve(
                view,
                model,
                None if cur is None else Placement(cur.copy()),
                self.exact_time_limit_s,
                initial=None if best is None else Placement(best.x.copy()),
                max_nodes=self.exact_nodes,
            )
        except NoFeasiblePlacement:
            return None
        found = ScoredPlacement(model, view, result.placement.assignment, cur)
        return found if result.proven_optimal and found.feasible() else None

    def _least_relocation(
        self,
        view: ResourceView,
        model: BlockTable,
        cur: np.ndarray,
        best: ScoredPlacement,
        candidates: list[ScoredPlacement],
        exact: bool,
    ) -> ScoredPlacement:
        """Among placements within FORCED_SLACK of the best, the one relocating fewest bytes.

        Every start and search result, moved back towards the current placement as far as
        the budget allows; where exact (the best is a proven optimum of a tiny instance),
        the MILP also solves for the fewest bytes directly.
        """
        budget_s = (1 + FORCED_SLACK) * best.objective()
        chosen = least_relocation([*candidates, best], budget_s)
        if exact:
            try:
                result = solve_least_moves(
                    view,
                    model,
                    Placement(cur.copy()),
                    budget_s,
                    self.exact_time_limit_s,
                    initial=Placement(chosen.x.copy()),
                    max_nodes=self.exact_nodes,
                )
            except NoFeasiblePlacement:
                return chosen
            exact = ScoredPlacement(model, view, result.placement.assignment, cur)
            if exact.feasible() and exact.objective() <= budget_s:
                chosen = least_relocation([chosen, exact], budget_s)
        return chosen

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
        self,
        view: ResourceView,
        model: BlockTable,
        cur: np.ndarray | None,
        chain: np.ndarray,
        free_gather_s: np.ndarray,
    ) -> Iterable[np.ndarray]:
        """Starts of the local search; chain is the memory-blind optimum, free_gather_s the
        best gather time per (input, projection device) without memory limits."""
        tiny = model.size * view.size <= self.tiny_size
        if cur is not None and (cur >= 0).all():
            yield cur.copy()
        greedy = greedy_chain(model, view, cur, free_gather_s.min(axis=1))
        if greedy is not None:
            yield greedy
        if tiny or _overflow_fraction(model, view, chain) <= self.repair_limit:
            repaired = repair_memory(model, view, chain, cur)
            if repaired is not None:
                yield repaired
        if cur is not None and is_forced(model, view, cur):
            # a forced re-plan starts from a repair of the current placement (lost blocks
            # refilled from the memory-blind optimum)
            patched = np.where(cur >= 0, cur, chain)
            repaired = repair_memory(model, view, patched, cur)
            if repaired is not None:
                yield repaired
        if tiny:
            fixed = sequential_fix(model, view, chain, cur)
            if fixed is not None:
                yield fixed
        if self.layer_seeds:
            for placement in layer_split_candidates(view, model):
                yield placement.assignment.copy()


def _at_latency_bound(
    best: ScoredPlacement | None, model: BlockTable, view: ResourceView, chain: np.ndarray
) -> bool:
    """Whether best already decodes as fast as the memory-free optimum (chain) and moves
    nothing: no placement's objective is lower, so the exact solver has nothing to add."""
    if best is None:
        return False
    w = view.window
    bound = w.horizon_tokens * float(cost.per_token_s(model, view, chain, w.mean_context))
    return best.objective() <= bound * (1 + 1e-9)


def _overflow_fraction(table: BlockTable, view: ResourceView, x: np.ndarray) -> float:
    """Bytes over the devices' memory as a fraction of all block bytes."""
    n = view.window.interval_end_context
    over = cost.memory_use(table, view, x, n) - view.memory_bytes
    return float(np.clip(over, 0, None).sum() / table.memory_bytes(n).sum())
