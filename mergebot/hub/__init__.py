"""Everything that talks to a Hugging Face Hub (real or the local devhub)."""
