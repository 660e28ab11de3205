"""Tools outside the core: the demo, dense references, host-sync and operator counters,
and the shared problem builder of the tests, demo, paper and benchmarks."""
