"""The linear algebra of the stage-wise factorizations: fronts with threshold pivoting,
explicit Bunch-Kaufman ``LDL^T``, the Riccati recursion and the paper's augmented solve
(docs/algorithm.md sections 4, 5, 8, 10). Knows stage derivatives through their
interface only, not networks."""
