"""Where the stages talk to the user: progress and results on `console` (rank 0 only under torchrun),
errors on `errors` (every rank), both on stderr so that stdout stays free for data."""
from __future__ import annotations

import os

from rich.console import Console

# QARIG_PROGRESS=lines: no live progress bars (the Makefile's choice when stages run side by side, whose bars
# would overwrite each other); the training stages print a line per held-out evaluation instead
LIVE = os.environ.get("QARIG_PROGRESS", "live") != "lines"
console = Console(stderr=True, soft_wrap=True, quiet=os.environ.get("RANK", "0") != "0",
                  force_interactive=None if LIVE else False)
errors = Console(stderr=True, soft_wrap=True)


def notice(message: str) -> None:
    """One line the user should read (a setting adjusted, a warning), not an error."""
    console.print(f"[yellow]note:[/yellow] {message}", highlight=False, soft_wrap=True)
