"""`mergekit-yaml` on many configs in one process: `python mergekit_driver.py CONFIG OUT_DIR [CONFIG OUT_DIR]...`.

Run by tests/mergekit_reference.py with the mergekit venv's python (it imports mergekit, which mergebot's venv
lacks). Starting Python with torch and transformers takes seconds and a tiny merge milliseconds, so one process
merges every config of a test session. Each goes through mergekit-yaml's own command line parser, as a user runs
it. A merge that fails leaves its traceback in OUT_DIR.error and the others still run, so each test reports its own.
"""

import sys
import traceback
from pathlib import Path

from mergekit.scripts.run_yaml import main as mergekit_yaml


def merge_all(arguments: list[str]) -> None:
    """Each (CONFIG, OUT_DIR) pair of `arguments` through mergekit-yaml, in order."""
    for config, out_dir in zip(arguments[::2], arguments[1::2], strict=True):
        try:
            mergekit_yaml.main([config, out_dir], prog_name="mergekit-yaml", standalone_mode=False)
        except Exception:
            Path(f"{out_dir}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    merge_all(sys.argv[1:])
