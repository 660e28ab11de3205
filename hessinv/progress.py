"""Progress bars for long sweeps: ``tqdm``, only where a person watches a terminal.

``progress=None`` (the default everywhere): a bar only when ``stderr`` is a terminal, and
only once the work has run for :data:`~hessinv.settings.PROGRESS_DELAY_S` seconds; in a
script whose output goes to a log, nothing. ``True`` forces a bar (at once, terminal or
not); ``False`` turns it off.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from hessinv.settings import PROGRESS_DELAY_S

__all__ = ["progress_bar", "wants_bar"]


def wants_bar(progress: bool | None) -> bool:
    """Whether a bar may be shown for the setting ``progress`` (see the module docstring)."""
    if progress is None:
        stream = sys.stderr
        return stream is not None and hasattr(stream, "isatty") and stream.isatty()
    return bool(progress)


def progress_bar(total: int, desc: str, progress: bool | None = None) -> tqdm:
    """A ``tqdm`` bar over ``total`` steps for the setting ``progress``."""
    return tqdm(
        total=total,
        desc=desc,
        disable=not wants_bar(progress),
        delay=0.0 if progress is True else PROGRESS_DELAY_S,
        leave=False,
    )
