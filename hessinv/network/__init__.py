"""The network side: splitting a model into a chain of stages, reading batches, choosing
each stage's derivative class, input checks, and the derivative sweep (docs/algorithm.md
sections 1, 2)."""
