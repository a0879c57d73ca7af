"""mergebot: keeps merged open LLMs up to date with their upstream models."""
