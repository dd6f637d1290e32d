"""Where the stages talk to the user: progress and results on `console` (rank 0 only under torchrun),
errors on `errors` (every rank), both on stderr so that stdout stays free for data."""
from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, soft_wrap=True, quiet=os.environ.get("RANK", "0") != "0")
errors = Console(stderr=True, soft_wrap=True)


def notice(message: str) -> None:
    """One line the user should read (a setting adjusted, a warning), not an error."""
    console.print(f"[yellow]note:[/yellow] {message}", highlight=False, soft_wrap=True)
