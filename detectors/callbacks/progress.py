"""Lightning's RichProgressBar, made to start on Lightning < 2.5.3 with rich >= 14.1."""

from __future__ import annotations

from importlib.metadata import version

from lightning.pytorch.callbacks import RichProgressBar as _LightningRichProgressBar
from packaging.version import Version
from rich.console import Console

# Lightning < 2.5.3 calls Console.clear_live() with no live display when a progress bar starts; since
# rich 14.1 (a stack of live displays) that raises "IndexError: pop from empty list" (Lightning PR #21016)
_NEEDS_SHIM = Version(version("lightning")) < Version("2.5.3")


class RichProgressBar(_LightningRichProgressBar):
    """Same bar; on an old Lightning its start skips ``clear_live()`` when there is no live display to clear."""

    def _init_progress(self, trainer) -> None:
        if not _NEEDS_SHIM:
            return super()._init_progress(trainer)
        clear_live = Console.clear_live

        def clear_if_live(console: Console) -> None:
            if getattr(console, "_live_stack", None) != []:  # rich < 14.1 has no stack: clear as before
                clear_live(console)

        Console.clear_live = clear_if_live
        try:
            super()._init_progress(trainer)
        finally:
            Console.clear_live = clear_live
