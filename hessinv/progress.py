"""Progress bars for long sweeps: ``tqdm``, shown only once a sweep has run for two seconds."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, disable: bool = False):
    """A ``tqdm`` bar over ``total`` steps that stays hidden for runs under two seconds."""
    return tqdm(total=total, desc=desc, disable=disable, delay=2.0, leave=False)
