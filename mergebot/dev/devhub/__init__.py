"""A local Hub that speaks the HTTP API huggingface_hub uses, for tests and the demo."""
