"""Progress display for long steps (tqdm on stderr; silent when disabled)."""
from __future__ import annotations

import sys
from contextlib import contextmanager

from tqdm import tqdm


class Progress:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    @contextmanager
    def task(self, name: str, total: int):
        bar = tqdm(total=total, desc=name, disable=not self.enabled, file=sys.stderr,
                   dynamic_ncols=True, leave=True, mininterval=0.5)
        try:
            yield bar
        finally:
            bar.close()

    def note(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)


def warn(message: str) -> None:
    """A warning the user should see whether or not progress is shown."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
