"""static-heads: the myopic planner's head-level placement, decided once and never migrated."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepart.controller.placement.base import Placement
from edgepart.controller.placement.myopic import MyopicPlanner
from edgepart.controller.view import PlanningWindow, ResourceView
from edgepart.llm.blocks import BlockTable


@dataclass
class StaticHeadsPlanner:
    """Myopic placement for the whole generation at once (memory held to the last token)."""

    name: str = "static-heads"
    replans: bool = False
    myopic: MyopicPlanner = field(default_factory=MyopicPlanner)

    def place(self, view: ResourceView, model: BlockTable, current: Placement | None) -> Placement:
        """One head-level placement that fits until the end of generation."""
        w = view.window
        whole_run = PlanningWindow(
            context_tokens=w.context_tokens,
            interval_tokens=max(1, w.final_context - w.context_tokens),
            final_context=w.final_context,
        )
        return self.myopic.place(view.at(whole_run), model, current)
