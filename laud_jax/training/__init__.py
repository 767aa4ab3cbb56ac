"""Training internals: steps, optimizer and schedules, distribution, logging, benchmarks."""
