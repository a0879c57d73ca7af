"""GGUF benchmark: writing a merge's GGUF file (mergebot.gguf.write_gguf) against a yardstick that only reads every
input byte and writes as many bytes as the GGUF holds, each as its own process: wall time, peak RSS, the ratio.

The checkpoint is merge_bench's synthetic Llama shape (bf16; `large` is 1.1B parameters, 2.2 GB), with a byte-level
BPE tokenizer in place of its word-level one (a GGUF needs a tokenizer llama.cpp has). Peak RSS is the point: the
conversion streams a block of rows at a time, so it should stay flat whatever the model's size.

    python bench/gguf_bench.py --size large --workdir /dev/shm/gguf-bench
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from merge_bench import SHARD, SIZES, YARDSTICK, timed, warm_up

CONVERT = """
import sys
from pathlib import Path
from mergebot.gguf.convert import write_gguf
written = write_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
print(written.size)
"""


def prepare(model: Path, size: str) -> None:
    """Runs in its own process, so the measuring process never imports torch."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from mergebot.dev.synthetic import make_model
    from tests.gguf_models import byte_level_tokenizer

    if not (model / "config.json").exists():
        shutil.rmtree(model, ignore_errors=True)
        make_model(model, shard_size=SHARD, **SIZES[size])
        for name in ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink(missing_ok=True)
        byte_level_tokenizer(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--types", default="F16,BF16,Q8_0")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.workdir / f"gguf-{args.size}"
    if args.prepare:
        prepare(model, args.size)
        return
    command = [sys.executable, __file__, "--prepare", "--size", args.size, "--workdir", str(args.workdir)]
    subprocess.run(command, check=True)
    files = [str(f) for f in sorted(model.glob("*.safetensors"))]
    print(f"size={args.size} model={sum(Path(f).stat().st_size for f in files) / 1e9:.2f} GB")
    print(f"{'type':<6} {'GGUF GB':>8} {'yardstick s':>11} {'mergebot s':>10} {'ratio':>6} {'RSS MB':>7}")
    out = args.workdir / "out.gguf"
    for file_type in args.types.split(","):
        warm_up(files)
        wall, rss = timed([sys.executable, "-c", CONVERT, str(model), str(out), file_type])
        size = out.stat().st_size
        out.unlink()
        yardstick, _ = timed([sys.executable, "-c", YARDSTICK, str(out), str(size), *files])
        out.unlink()
        ratio = wall / yardstick
        print(f"{file_type:<6} {size / 1e9:>8.2f} {yardstick:>11.2f} {wall:>10.2f} {ratio:>6.2f} {rss:>7.0f}")


if __name__ == "__main__":
    main()
