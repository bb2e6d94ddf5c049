"""Forced re-plans: when the current placement cannot go on, relocate as little as possible.

A re-plan is forced when the current placement cannot serve the planning window: some of
its blocks sat on a device that is gone (their state is lost), or memory does not hold
them until the horizon's last token. Any placement then costs a switch, and the best
objective is often reached by many placements that differ mostly in how much they move.
So a forced decision takes, among the placements within FORCED_SLACK of the best
objective found, the one relocating the fewest bytes (``relocated_bytes``): each start
and search result of the planner is first moved back towards the current placement as
far as the budget allows (``move_back``), and the one relocating least wins
(``least_relocation``). The planner's seeds include a memory repair of the current
placement, so a repair within the slack is always among them.
"""

from __future__ import annotations

import numpy as np

from edgepart.controller import cost
from edgepart.controller.placement.scored_placement import MEMORY_SLACK_BYTES, ScoredPlacement
from edgepart.controller.view import ResourceView
from edgepart.llm.blocks import BlockTable

__all__ = [
    "FORCED_SLACK",
    "alive_current",
    "is_forced",
    "least_relocation",
    "move_back",
    "relocated_bytes",
]

#: how far (relative) a forced decision's objective may lie above the best found, to
#: relocate fewer bytes: a few percent of one horizon's decode time, against blocks whose
#: weights every target must build before the switch
FORCED_SLACK = 0.03


def alive_current(view: ResourceView, current: np.ndarray) -> np.ndarray:
    """The current assignment with blocks on dead devices marked -1 (their state is lost)."""
    cur = np.asarray(current, dtype=np.int64).copy()
    cur[(cur >= 0) & ~view.alive[np.clip(cur, 0, None)]] = -1
    return cur


def is_forced(table: BlockTable, view: ResourceView, current: np.ndarray | None) -> bool:
    """Whether the current assignment (-1: block lost with its device) cannot go on.

    Forced: a block was lost, or memory does not hold the blocks until the horizon's last
    token (``edgepart.controller.cost.fits``, which also rejects dead devices).
    """
    if current is None:
        return False
    if (current < 0).any():
        return True
    return not cost.fits(table, view, current, view.window.interval_end_context)


def relocated_bytes(
    table: BlockTable, view: ResourceView, assignment: np.ndarray, current: np.ndarray
) -> np.ndarray | float:
    """Bytes a switch relocates: weights and KV (at the current context) of every block
    leaving the live device it is on; (P,) for a batch (P, B) of assignments."""
    nbytes = table.memory_bytes(view.window.context_tokens)
    leaving = (np.asarray(assignment) != current) & (current >= 0)
    total = (leaving * nbytes).sum(axis=-1)
    return float(total) if np.ndim(total) == 0 else total


def move_back(search: ScoredPlacement, budget_s: float) -> None:
    """Return blocks to their current device while the objective stays within budget_s.

    Most bytes first, in passes: each pass prices every return's decode change in one
    batch. A return only shortens its link's transfer, so the migration delay cannot grow
    and the decode change bounds the objective's; returns in layers next to one already
    made this pass are priced again exactly. Passes repeat while something returns (one
    return can make room for another).
    """
    cur = search.cur
    assert cur is not None
    nbytes = search.table.memory_bytes(search.view.window.context_tokens)
    home = np.clip(cur, 0, None)
    while True:
        away = np.nonzero((search.x != cur) & (cur >= 0) & search.usable[home])[0]
        if away.size == 0:
            return
        decode = search.decode_change_s(away, home[away])
        touched = np.zeros(search.table.spec.layers, dtype=bool)
        for i in np.argsort(-nbytes[away], kind="stable"):
            b, ell = int(away[i]), int(search.block_layer[away[i]])
            delta = decode[i]
            if touched[max(ell - 1, 0) : ell + 2].any():
                delta = search.score(np.array([b]), np.array([[cur[b]]]))[0]
            room = search.cap[cur[b]] + MEMORY_SLACK_BYTES - search.used[cur[b]]
            if search.block_mem[b] <= room and search.objective() + delta <= budget_s:
                search.apply(np.array([b]), np.array([cur[b]]))
                touched[ell] = True
        if not touched.any():
            return


def least_relocation(candidates: list[ScoredPlacement], budget_s: float) -> ScoredPlacement:
    """The candidate relocating the fewest bytes once moved back within budget_s.

    Candidates over the budget (or over memory) are left out; among those relocating as
    much, the lower objective wins. Moves the candidates in place; at least one must be
    within the budget.
    """
    best: tuple[float, float] | None = None
    chosen = None
    seen: set[bytes] = set()
    for search in candidates:
        if search.x.tobytes() in seen or not search.feasible() or search.objective() > budget_s:
            continue  # the same start twice (one left unsearched) is moved back once
        seen.add(search.x.tobytes())
        move_back(search, budget_s)
        key = (
            relocated_bytes(search.table, search.view, search.x, search.cur),
            search.objective(),
        )
        if best is None or key < best:
            best, chosen = key, search
    if chosen is None:
        raise ValueError("no candidate within the budget")
    return chosen
