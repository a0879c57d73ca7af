"""`mergekit-moe` on many configs in one process: `python mergekit_moe_driver.py CONFIG OUT_DIR [CONFIG OUT_DIR]...`.

Run by tests/test_mergekit_moe.py with the mergekit venv's python, as tests/mergekit_driver.py runs mergekit-yaml:
each config through mergekit-moe's own command line parser; one that fails leaves its traceback in OUT_DIR.error.
"""

import sys
import traceback
from pathlib import Path

from mergekit.scripts.moe import main as mergekit_moe


def build_all(arguments: list[str]) -> None:
    """Each (CONFIG, OUT_DIR) pair of `arguments` through mergekit-moe, in order."""
    for config, out_dir in zip(arguments[::2], arguments[1::2], strict=True):
        try:
            mergekit_moe.main([config, out_dir], prog_name="mergekit-moe", standalone_mode=False)
        except BaseException:  # mergekit-moe leaves by sys.exit on a config it refuses
            Path(f"{out_dir}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    build_all(sys.argv[1:])
