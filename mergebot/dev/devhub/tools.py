"""`mergebot devhub push` and `make-model`: filling your own local Hub (or any Hub) with models to merge."""

import argparse
from pathlib import Path

from mergebot.errors import ConfigError
from mergebot.hub.client import HubClient


def push_folder(model_dir: Path, repo: str, endpoint: str) -> str:
    """Upload every file under `model_dir` to `repo` on `endpoint` as one commit on main (the repo is created if
    missing; HF_TOKEN is sent if set). Returns the commit's sha."""
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory")
    files = {
        path.relative_to(model_dir).as_posix(): path
        for path in sorted(model_dir.rglob("*"))
        if path.is_file() and ".cache" not in path.relative_to(model_dir).parts
    }
    if not files:
        raise ConfigError(f"{model_dir}: no files to push")
    client = HubClient(endpoint)
    client.create_repo(repo, private=False)
    return client.commit(repo, files, (), f"Upload {model_dir.name} with mergebot devhub push", parent=None)


def make_model(args: argparse.Namespace) -> Path:
    """A small random Llama-shaped checkpoint (mergebot.dev.synthetic), or a seeded 'fine-tune' of one."""
    from mergebot.dev.synthetic import make_model as write_model

    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty directory")
    try:
        return write_model(
            out,
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            vocab=args.vocab,
            seed=args.seed,
            base=Path(args.fine_tune_of) if args.fine_tune_of else None,
        )
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(f"make-model {out}: {error}") from error
