"""Streaming merges: pure methods, the plan, tensor I/O, checkpoints and the engine that runs them."""
