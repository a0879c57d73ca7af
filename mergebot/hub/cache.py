"""Keeping the standard Hugging Face cache (HF_HOME) from growing without bound: revisions nothing needs go.

Deletion stays inside each repo's own cache folder: a snapshot, ref or blob is removed by its place in that folder,
never by where a link in it points (huggingface_hub's delete strategy follows snapshot links to their blobs, and
a link a hostile endpoint planted could name any file)."""

import os
import shutil
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name


def clean_cache(cache_dir: Path, repos: set[str], keep: set[tuple[str, str]]) -> tuple[int, int]:
    """Remove cached revisions of `repos` that are not in `keep` (repo, sha); other repos are not ours to touch.

    Returns (revisions removed, bytes freed)."""
    removed = freed = 0
    for repo in sorted(repos):
        folder = cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
        if folder.is_dir() and not folder.is_symlink():
            count, size = _clean_repo(folder, {sha for name, sha in keep if name == repo})
            removed, freed = removed + count, freed + size
    return removed, freed


def _clean_repo(folder: Path, keep: set[str]) -> tuple[int, int]:
    snapshots, blobs = folder / "snapshots", folder / "blobs"
    doomed = [entry for entry in _entries(snapshots) if entry.name not in keep]
    for entry in doomed:
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()  # the link itself, inside the folder
        else:
            shutil.rmtree(entry)  # removes links inside it, never what they point to
    names = {entry.name for entry in doomed}
    for ref in (folder / "refs").rglob("*") if (folder / "refs").is_dir() else ():
        if ref.is_file() and not ref.is_symlink() and ref.stat().st_size <= 64 and ref.read_text().strip() in names:
            ref.unlink()
    used = {_blob_name(link, blobs) for entry in _entries(snapshots) for link in entry.rglob("*")}
    freed = 0
    for blob in _entries(blobs):
        if blob.name in used or blob.name.endswith(".incomplete") or not (blob.is_symlink() or blob.is_file()):
            continue
        freed += 0 if blob.is_symlink() else blob.stat().st_size
        blob.unlink()
    return len(doomed), freed


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []


def _blob_name(link: Path, blobs: Path) -> str | None:
    """The blob a snapshot link names in this repo's blobs folder (its first hop: a blob may itself be a link into a
    shared store); None for anything else."""
    if not link.is_symlink():
        return None
    target = Path(os.path.abspath(link.parent / os.readlink(link)))
    return target.name if target.parent == Path(os.path.abspath(blobs)) else None
