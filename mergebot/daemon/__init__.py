"""The long-running daemon: scheduling, state, endpoints. Never imports torch."""
