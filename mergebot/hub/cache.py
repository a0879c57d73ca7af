"""Keeping the standard Hugging Face cache (HF_HOME) from growing without bound: revisions nothing needs go."""

from pathlib import Path

from huggingface_hub import scan_cache_dir


def clean_cache(cache_dir: Path, repos: set[str], keep: set[tuple[str, str]]) -> tuple[int, int]:
    """Remove cached revisions of `repos` that are not in `keep` (repo, sha); other repos are not ours to touch.

    Returns (revisions removed, bytes freed)."""
    if not cache_dir.exists():
        return 0, 0
    scan = scan_cache_dir(cache_dir)
    doomed = [
        revision.commit_hash
        for cached in scan.repos
        if cached.repo_type == "model" and cached.repo_id in repos
        for revision in cached.revisions
        if (cached.repo_id, revision.commit_hash) not in keep
    ]
    if not doomed:
        return 0, 0
    strategy = scan.delete_revisions(*doomed)
    strategy.execute()
    return len(doomed), strategy.expected_freed_size
