"""Development aids: the local Hub, synthetic models, the demo. Imported lazily by the CLI only."""
