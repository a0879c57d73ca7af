"""Merge benchmark: `mergebot merge` against a yardstick that only reads every input byte and writes the output.

Generates a base and three fine-tunes (Llama-shaped, bf16) and, for each method, runs the yardstick over the same
inputs and then the merge, each as its own process, printing wall time, peak RSS and the ratio to the yardstick
(flagged when a merge beats it: the yardstick must be the fastest way to move those bytes). Beside them it runs
mergekit-yaml 0.1.5 (from .venv-mergekit, which .ci/run makes) on the same merge, and prints how many times longer
it takes. After the methods, the validation gate on the first method's merge, with cold caches (gate_line.py).
Targets: every method at most 2x the yardstick (linear, slerp, task_arithmetic and passthrough 1.3x), peak RSS
at most 300 MB, at both sizes.

    python bench/merge_bench.py --size medium          # ~0.7 GB per model
    python bench/merge_bench.py --size large           # ~1.1B parameters per model
    python bench/merge_bench.py --size mistral7b-5     # Mistral-7B's shapes, 5 layers: a TIES merge of a base
                                                       # and two fine-tunes from start to exit, its validation,
                                                       # mergekit-yaml's merge (~11 GB of disk, freed after)
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gate_line import MISTRAL, measured, validation_line

SIZES = {
    "tiny": {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 8, "kv_heads": 8, "vocab": 8000},
    "small": {"hidden": 256, "layers": 4, "intermediate": 1024, "heads": 8, "kv_heads": 8, "vocab": 32000},
    "medium": {"hidden": 1024, "layers": 16, "intermediate": 4096, "heads": 16, "kv_heads": 16, "vocab": 32000},
    "large": {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000},
}
SHARD = 1_000_000_000
BF16_BYTES = 2

YARDSTICK = """
import os, sys, threading
out, size, threads, block, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
reads = [(os.open(name, os.O_RDONLY), offset) for name in files for offset in range(0, os.path.getsize(name), block)]
writes = range(0, size, block)
order = sorted([(n / len(reads), 0, task) for n, task in enumerate(reads)]
               + [((n + 1) / len(writes), 1, offset) for n, offset in enumerate(writes)])
tasks, sink = iter(order), os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
def work():
    buffer = bytearray(block)
    view = memoryview(buffer)
    while (task := next(tasks, None)) is not None:
        if task[1]:
            offset = task[2]
            os.pwrite(sink, view[: min(block, size - offset)], offset)
        else:
            descriptor, offset = task[2]
            os.preadv(descriptor, [view], offset)
workers = [threading.Thread(target=work) for _ in range(threads)]
for worker in workers: worker.start()
for worker in workers: worker.join()
os.fsync(sink)
"""
"""The fastest this machine reads every input byte and writes the output's bytes: as many threads as the merge
computes on, each reading one block (the engine's size) at a time with pread into its own buffer and writing the
output's blocks with pwrite, reads and writes interleaved in the engine's proportion, then one fsync."""


def size_name(text: str) -> str:
    if text in SIZES or re.fullmatch(r"mistral7b-[1-9][0-9]?", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: not one of {', '.join(SIZES)} or mistral7b-LAYERS")


def shape_of(size: str) -> dict[str, int]:
    if size.startswith("mistral7b-"):
        return {**MISTRAL, "layers": int(size.split("-")[1])}
    return SIZES[size]


def fine_tunes(size: str) -> tuple[int, ...]:
    """Seeds of the fine-tunes: three, or two at Mistral's shapes (three inputs and the output fill the disk)."""
    return (1, 2) if size.startswith("mistral7b-") else (1, 2, 3)


def generate(root: Path, size: str) -> dict[str, Path]:
    """Runs in its own process (see --prepare), so the measuring process never imports torch: a child forked from a
    process holding torch would count that memory in its own peak RSS."""
    from mergebot.dev.synthetic import make_model
    from mergebot.files import FileHashes

    shape = shape_of(size)
    models = {}
    base = root / "base"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_model(base, shard_size=SHARD, **shape)
    models["base"] = base
    for seed in fine_tunes(size):
        path = root / f"ft{seed}"
        if not (path / "config.json").exists():
            shutil.rmtree(path, ignore_errors=True)
            make_model(path, base=base, seed=seed, shard_size=SHARD)
        models[f"ft{seed}"] = path
    hashes = FileHashes(root / "hash-cache")
    for model in models.values():
        for file in model.glob("*.safetensors"):
            hashes.sha256(file)
    return models


def timed(command: list[str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system: what the other users' load does not change
    much, on a shared machine) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def yardstick(out: Path, size: int, files: list[str], threads: int = 0, block: int = 0) -> list[str]:
    """The yardstick's command: by default with the merge's threads and block size."""
    from mergebot.merge.engine import BLOCK_ELEMENTS
    from mergebot.merge.threads import thread_count

    settings = [str(size), str(threads or thread_count()), str(block or BLOCK_ELEMENTS * BF16_BYTES)]
    return [sys.executable, "-c", YARDSTICK, str(out), *settings, *files]


def calibrate(root: Path, models: dict[str, Path], out_bytes: int) -> None:
    """The yardstick beside variants of itself on every model's files: it should be the fastest of them."""
    from mergebot.merge.engine import BLOCK_ELEMENTS
    from mergebot.merge.threads import thread_count

    files = [str(f) for model in models.values() for f in sorted(model.glob("*.safetensors"))]
    warm_up(files)
    variants = {
        "as set": {},
        "1 thread": {"threads": 1},
        "2x threads": {"threads": 2 * thread_count()},
        "8x block": {"block": 8 * BF16_BYTES * BLOCK_ELEMENTS},
    }
    times = {name: min(timed(yardstick(root / "yardstick.out", out_bytes, files, **v))[0] for _ in range(3))
             for name, v in variants.items()}  # fmt: skip
    print(f"yardstick ({thread_count()} threads, pread, blocks of 2 MiB), 4 inputs: "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items()))  # fmt: skip


def warm_up(files: list[str]) -> None:
    """Read the inputs once so both sides start from the page cache, not from whichever ran first."""
    buffer = bytearray(64 << 20)
    for name in files:
        with open(name, "rb") as source:
            while source.readinto(buffer):
                pass


WEIGHTED = {
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "nuslerp",
    "multislerp",
}
DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
PAIRS = {"slerp": "t=0.4", "nearswap": "t=0.001", "arcee_fusion": None}
"""Methods of a base and one model, with the parameter each needs."""
METHODS = ["linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl", "model_stock", "nuslerp",
           "multislerp", "karcher", "nearswap", "arcee_fusion", "passthrough"]  # fmt: skip


def method_setup(method: str, models: dict[str, Path]) -> tuple[Path | None, list[tuple[Path, dict]], dict]:
    """The base (or None), each model with its parameters, and the method's parameters, for one method."""
    base, fts = models["base"], [models[f"ft{i}"] for i in (1, 2, 3)]
    if method == "passthrough":
        return None, [(base, {})], {}
    if method in PAIRS:
        return base, [(fts[0], {})], dict([PAIRS[method].split("=")]) if PAIRS[method] else {}
    if method == "linear":
        return None, [(model, {"weight": 0.25}) for model in (base, *fts)], {}
    if method == "nuslerp":
        return None, [(ft, {"weight": 0.5}) for ft in fts[:2]], {}
    per_model = {"weight": 0.4} if method in WEIGHTED else {}
    if method in DENSITY:
        per_model["density"] = 0.5
    return base, [(ft, dict(per_model)) for ft in fts], {}


def mergebot_command(method: str, setup: tuple, out: Path) -> list[str]:
    base, inputs, settings = setup
    command = [sys.executable, "-m", "mergebot.cli", "--log-level", "warning", "merge", "--method", method]
    command += ["--base-model", str(base)] if base else []
    command += [f"{model}:{params['weight']}" if "weight" in params else str(model) for model, params in inputs]
    density = {p["density"] for _, p in inputs if "density" in p}
    for key, value in [*settings.items(), *(("density", d) for d in density)]:
        command += ["--set", f"{key}={value}"]
    return [*command, "--out-shard-size", "1GB", str(out)]


def mergekit_command(method: str, setup: tuple, out: Path, mergekit: Path) -> list[str]:
    """mergekit-yaml on the same merge, written as its YAML (JSON is YAML)."""
    base, inputs, settings = setup
    config = {
        "merge_method": method,
        "dtype": "bfloat16",
        "models": [{"model": str(model), **({"parameters": params} if params else {})} for model, params in inputs],
        **({"base_model": str(base)} if base else {}),
        **({"parameters": {key: float(value) for key, value in settings.items()}} if settings else {}),
    }
    if method == "passthrough":
        layers = json.loads((inputs[0][0] / "config.json").read_text())["num_hidden_layers"]
        source = {"model": str(inputs[0][0]), "layer_range": [0, layers]}
        config = {"merge_method": method, "dtype": "bfloat16", "slices": [{"sources": [source]}]}
    path = out.with_suffix(".yml")
    path.write_text(json.dumps(config))
    return [str(mergekit), str(path), str(out), "--out-shard-size", "1B"]


def compile_loops(method: str, workdir: Path) -> None:
    """The method once on the tiny models, so that the measured merge finds its loops compiled (numba's cache),
    as on any machine after its first merge."""
    tiny = workdir / "tiny"
    subprocess.run([sys.executable, __file__, "--prepare", "--size", "tiny", "--workdir", str(workdir)], check=True)
    models = {name: tiny / name for name in ("base", "ft1", "ft2", "ft3")}
    shutil.rmtree(tiny / "warm-up", ignore_errors=True)
    timed(mergebot_command(method, method_setup(method, models), tiny / "warm-up"))


def end_to_end(root: Path, models: dict[str, Path], mergekit: Path | None) -> None:
    """A TIES merge of a base and two fine-tunes from start to exit (inputs in the page cache, the fused loops
    compiled by the small merge before it), its validation with cold caches, and mergekit-yaml's merge beside;
    then every file of this size is deleted."""
    setup = (models["base"], [(models[f"ft{seed}"], {"weight": 0.5, "density": 0.5}) for seed in (1, 2)], {})
    compile_loops("ties", root.parent)
    out = root / "out-ties"
    for leftover in (out, root / ".out-ties.partial", root / "mergekit-ties"):
        shutil.rmtree(leftover, ignore_errors=True)
    warm_up([str(f) for model in models.values() for f in sorted(model.glob("*.safetensors"))])
    wall, peaks = measured(mergebot_command("ties", setup, out))
    print(f"ties, start to exit: {wall:.1f} s, peak RSS {peaks['VmHWM']:.0f} MB", flush=True)
    print(validation_line(out, list(models.values()), root / "hash-cache"), flush=True)
    shutil.rmtree(out)
    if mergekit:
        warm_up([str(f) for model in models.values() for f in sorted(model.glob("*.safetensors"))])
        wall_mergekit, peaks = measured(mergekit_command("ties", setup, root / "mergekit-ties", mergekit))
        print(f"mergekit-yaml ties: {wall_mergekit:.1f} s ({wall_mergekit / wall:.1f}x), peak RSS "
              f"{peaks['VmHWM']:.0f} MB", flush=True)  # fmt: skip
        shutil.rmtree(root / "mergekit-ties")
    shutil.rmtree(root)  # the inputs too: at this size they fill the disk, and they are made again in minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_name, default="medium", help="tiny, small, medium, large, mistral7b-LAYERS")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeat", type=int, default=1, help="pairs per method; medians are printed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergebot-bench"))
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--mergekit",
        type=Path,
        default=Path(__file__).parent.parent / ".venv-mergekit" / "bin" / "mergekit-yaml",
        help="mergekit-yaml to run beside (the .venv-mergekit that .ci/run makes); a missing one is skipped",
    )
    parser.add_argument("--no-mergekit", dest="mergekit", action="store_const", const=None)
    args = parser.parse_args()

    root = args.workdir / args.size
    root.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        generate(root, args.size)
        return
    started = time.perf_counter()
    prepare = [sys.executable, __file__, "--prepare", "--size", args.size, "--workdir", str(args.workdir)]
    subprocess.run(prepare, check=True)
    models = {name: root / name for name in ("base", *(f"ft{seed}" for seed in fine_tunes(args.size)))}
    input_gb = sum(f.stat().st_size for f in models["base"].glob("*.safetensors")) / 1e9
    elapsed = time.perf_counter() - started
    print(f"size={args.size} per-model={input_gb:.2f} GB (generated and sha256-hashed once in {elapsed:.0f} s)")
    os.environ["MERGEBOT_CACHE_DIR"] = str(root / "hash-cache")
    os.environ["NUMBA_CACHE_DIR"] = str(args.workdir / "numba")
    mergekit = args.mergekit if args.mergekit and args.mergekit.exists() else None
    if args.size.startswith("mistral7b-"):
        end_to_end(root, models, mergekit)
        return
    out_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    calibrate(root, models, out_bytes)
    header = f"{'method':<17} {'yardstick s':>11} {'mergebot s':>10} {'ratio':>6} {'RSS MB':>7}"
    header += f" {'CPU s':>7} {'CPU s':>8} {'CPU ratio':>9}"
    print(header + (f" {'mergekit s':>10} {'RSS MB':>7} {'mergekit/mergebot':>17}" if mergekit else ""))
    validated: tuple[Path, list[Path]] | None = None
    """The first method's output and inputs: the gate is measured on it."""
    for method in args.methods.split(","):
        setup = method_setup(method, models)
        inputs = [setup[0], *(model for model, _ in setup[1])] if setup[0] else [model for model, _ in setup[1]]
        files = [str(f) for model in inputs for f in sorted(model.glob("*.safetensors"))]
        warm_up(files)
        runs: dict[str, list[tuple[float, float, float]]] = {"yard": [], "mergebot": [], "mergekit": []}
        compile_loops(method, args.workdir)
        for _ in range(args.repeat):
            out = root / f"out-{method}"
            for leftover in (out, root / f".out-{method}.partial", root / f"mergekit-{method}"):
                shutil.rmtree(leftover, ignore_errors=True)
            runs["yard"].append(timed(yardstick(root / "yardstick.out", out_bytes, files)))
            runs["mergebot"].append(timed(mergebot_command(method, setup, out)))
            if mergekit:
                runs["mergekit"].append(timed(mergekit_command(method, setup, root / f"mergekit-{method}", mergekit)))
        wall = {name: statistics.median(t for t, _, _ in times) for name, times in runs.items() if times}
        rss = {name: max(r for _, r, _ in times) for name, times in runs.items() if times}
        cpu = {name: statistics.median(c for _, _, c in times) for name, times in runs.items() if times}
        line = f"{method:<17} {wall['yard']:>11.2f} {wall['mergebot']:>10.2f} {wall['mergebot'] / wall['yard']:>6.2f} "
        line += f"{rss['mergebot']:>7.0f} {cpu['yard']:>7.2f} {cpu['mergebot']:>8.2f}"
        line += f" {cpu['mergebot'] / cpu['yard']:>9.2f}"
        if mergekit:
            ratio = wall["mergekit"] / wall["mergebot"]
            line += f" {wall['mergekit']:>10.2f} {rss['mergekit']:>7.0f} {ratio:>17.1f}"
        print(line + ("  (under the yardstick: it is not tight)" if wall["mergebot"] < 0.95 * wall["yard"] else ""))
        if validated is None:
            validated = (out, inputs)
        else:
            shutil.rmtree(out)
        shutil.rmtree(root / f"mergekit-{method}", ignore_errors=True)
    (root / "yardstick.out").unlink(missing_ok=True)
    if validated:
        print(f"{validated[0].name}: {validation_line(*validated, root / 'hash-cache')}", flush=True)
        shutil.rmtree(validated[0])


if __name__ == "__main__":
    main()
