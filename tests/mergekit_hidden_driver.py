"""`mergekit-moe` on each config twice: `python mergekit_hidden_driver.py CONFIG OUT [CONFIG OUT]...`.

Run by tests/test_moe_hidden.py with the mergekit venv's python. mergekit-moe's `hidden` router loads the base model
in bfloat16 whatever its dtype, so its router carries bfloat16 rounding, compounded layer by layer. OUT/as-is is
mergekit-moe as users run it; OUT/float32 is the same command with that one load made in float32 (mergekit's router
code otherwise untouched), which mergebot's float32 router must match to float32 rounding. A failure leaves its
traceback in OUT/as-is.error or OUT/float32.error.
"""

import sys
import traceback
from pathlib import Path

import mergekit.moe.router as router
import torch
from mergekit.scripts.moe import main as mergekit_moe
from transformers import AutoModelForCausalLM


class _Float32Loader:
    """Stands in for AutoModelForCausalLM in mergekit's router module: the same load, in float32."""

    @staticmethod
    def from_pretrained(*args, **kwargs):
        kwargs.pop("torch_dtype", None)
        return AutoModelForCausalLM.from_pretrained(*args, **kwargs, dtype=torch.float32)


def merge(config: str, out_dir: str) -> None:
    try:
        mergekit_moe.main([config, out_dir, "--device", "cpu"], prog_name="mergekit-moe", standalone_mode=False)
    except Exception:
        Path(f"{out_dir}.error").write_text(traceback.format_exc())


if __name__ == "__main__":
    pairs = list(zip(sys.argv[1::2], sys.argv[2::2], strict=True))
    for config, out in pairs:
        merge(config, f"{out}/as-is")
    router.AutoModelForCausalLM = _Float32Loader
    for config, out in pairs:
        merge(config, f"{out}/float32")
