"""Experiments backing the claims of Rahimi, "The Hessian of tall-skinny networks is easy
to invert" (arXiv 2601.06096), run on the ``hessinv`` implementation.

``python -m paper [--quick | --full]``; see ``paper/README.md``.
"""

EXPERIMENTS = ("E1", "E2", "E3", "E4", "E5", "E6", "E7")
