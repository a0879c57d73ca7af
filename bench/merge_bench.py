"""Merge benchmark: `mergebot merge` against a yardstick that only reads every input byte and writes the output.

Generates a base and three fine-tunes (Llama-shaped, bf16) and, for each method, runs the yardstick over the same
inputs and then the merge, each as its own process, printing wall time, peak RSS and the ratio to the yardstick.
Beside them it runs mergekit-yaml 0.1.5 (from .venv-mergekit, which .ci/run makes) on the same merge, and prints
how many times longer it takes. Targets: every method at most 2x the yardstick (linear, slerp and
task_arithmetic 1.3x), peak RSS at most ~400 MB, at both sizes.

    python bench/merge_bench.py --size medium          # ~0.7 GB per model
    python bench/merge_bench.py --size large           # ~1.1B parameters per model
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "tiny": {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 8, "kv_heads": 8, "vocab": 8000},
    "small": {"hidden": 256, "layers": 4, "intermediate": 1024, "heads": 8, "kv_heads": 8, "vocab": 32000},
    "medium": {"hidden": 1024, "layers": 16, "intermediate": 4096, "heads": 16, "kv_heads": 16, "vocab": 32000},
    "large": {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000},
}
SHARD = 1_000_000_000

YARDSTICK = """
import sys
from pathlib import Path
out, size, files = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
buffer = bytearray(64 << 20)
view = memoryview(buffer)
with out.open("wb") as sink:
    for name in files:
        with open(name, "rb") as source:
            while count := source.readinto(buffer):
                if size > 0:
                    sink.write(view[: min(count, size)])
                    size -= min(count, size)
    sink.flush()
    import os
    os.fsync(sink.fileno())
"""


def generate(root: Path, size: str) -> dict[str, Path]:
    """Runs in its own process (see --prepare), so the measuring process never imports torch: a child forked from a
    process holding torch would count that memory in its own peak RSS."""
    from mergebot.dev.synthetic import make_model
    from mergebot.files import FileHashes

    shape = SIZES[size]
    models = {}
    base = root / "base"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        make_model(base, shard_size=SHARD, **shape)
    models["base"] = base
    for seed in (1, 2, 3):
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


def timed(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
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
    models = {name: root / name for name in ("base", "ft1", "ft2", "ft3")}
    input_gb = sum(f.stat().st_size for f in models["base"].glob("*.safetensors")) / 1e9
    elapsed = time.perf_counter() - started
    print(f"size={args.size} per-model={input_gb:.2f} GB (generated and sha256-hashed once in {elapsed:.0f} s)")
    mergekit = args.mergekit if args.mergekit and args.mergekit.exists() else None
    header = f"{'method':<17} {'yardstick s':>11} {'mergebot s':>10} {'ratio':>6} {'RSS MB':>7}"
    print(header + (f" {'mergekit s':>10} {'RSS MB':>7} {'mergekit/mergebot':>17}" if mergekit else ""))
    os.environ["MERGEBOT_CACHE_DIR"] = str(root / "hash-cache")
    out_bytes = sum(f.stat().st_size for f in models["base"].glob("*.safetensors"))
    for method in args.methods.split(","):
        setup = method_setup(method, models)
        inputs = [setup[0], *(model for model, _ in setup[1])] if setup[0] else [model for model, _ in setup[1]]
        files = [str(f) for model in inputs for f in sorted(model.glob("*.safetensors"))]
        warm_up(files)
        runs: dict[str, list[tuple[float, float]]] = {"yard": [], "mergebot": [], "mergekit": []}
        shutil.rmtree(root / "warm-up", ignore_errors=True)
        timed(mergebot_command(method, setup, root / "warm-up"))  # compiles the fused loops once per machine
        for _ in range(args.repeat):
            out = root / f"out-{method}"
            for leftover in (out, root / f".out-{method}.partial", root / f"mergekit-{method}"):
                shutil.rmtree(leftover, ignore_errors=True)
            yardstick = [sys.executable, "-c", YARDSTICK, str(root / "yardstick.out"), str(out_bytes), *files]
            runs["yard"].append(timed(yardstick))
            runs["mergebot"].append(timed(mergebot_command(method, setup, out)))
            if mergekit:
                runs["mergekit"].append(timed(mergekit_command(method, setup, root / f"mergekit-{method}", mergekit)))
        wall = {name: statistics.median(t for t, _ in times) for name, times in runs.items() if times}
        rss = {name: max(r for _, r in times) for name, times in runs.items() if times}
        line = f"{method:<17} {wall['yard']:>11.2f} {wall['mergebot']:>10.2f} {wall['mergebot'] / wall['yard']:>6.2f} "
        line += f"{rss['mergebot']:>7.0f}"
        if mergekit:
            ratio = wall["mergekit"] / wall["mergebot"]
            line += f" {wall['mergekit']:>10.2f} {rss['mergekit']:>7.0f} {ratio:>17.1f}"
        print(line, flush=True)
    (root / "yardstick.out").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
