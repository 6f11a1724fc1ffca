"""Optional JSON-lines record of every hand-off outcome (config field ``handoff_log``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class HandoffLog:
    """Appends one line per ended hand-off; a no-op when the config sets no path."""

    def __init__(self, template: str | None, *, instance: str, rank: int, role: str):
        self.path = template.replace("{instance}", instance).replace("{rank}", str(rank)) if template else None
        self._fixed = {"instance": instance, "rank": rank, "role": role}
        self._lock = threading.Lock()

    def append(self, result: Any) -> None:
        if self.path is None:
            return
        line = json.dumps({"time": time.time(), **self._fixed, **dataclasses.asdict(result)})
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            log.warning("cannot append to handoff_log %s: %s", self.path, e)
