"""Which steps run the network and which are forecast.

The TaylorSeer/HiCache cadence: the first ``first_enhance`` steps are computed (warm-up),
then one step in every ``interval`` is computed and the ``interval - 1`` steps after it
are forecast; optionally the last ``last_enhance`` steps of a run of known length are
computed too.  A step is always computed while there is nothing to forecast from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    interval: int = 5
    first_enhance: int = 3
    last_enhance: int = 0

    def should_compute(self, step: int, since_compute: int, has_anchor: bool,
                       num_steps: Optional[int] = None) -> bool:
        """``since_compute``: steps forecast since the last computed step."""
        if not has_anchor or step < self.first_enhance:
            return True
        if num_steps is not None and self.last_enhance and step >= num_steps - self.last_enhance:
            return True
        return since_compute >= self.interval - 1

    def plan(self, num_steps: int) -> List[bool]:
        """``True`` for every computed step of a run of ``num_steps`` steps."""
        out, since, anchor = [], 0, False
        for i in range(num_steps):
            c = self.should_compute(i, since, anchor, num_steps)
            out.append(c)
            since = 0 if c else since + 1
            anchor = anchor or c
        return out
