"""Parents whose weights moved far more than a fine-tune moves them: a damaged upload that still reads text almost
as well as its siblings (a ~10% perplexity loss passes any perplexity limit) must not be a parent the merge is
judged against.

Per tensor, each parent's relative distance ‖P − R‖ / ‖R‖ to the nearest other model R (the base and the other
parents are all among the parents). Fine-tunes of one model move every tensor by about the same small fraction;
a damaged tensor moves by a large fraction. A parent is suspect when one of its tensors is both far (above
MIN_DISTANCE) and far beyond the typical distance of all tensors of all parents (`outlier` times the median).
With two parents the distance is symmetric: both look damaged in the same tensors, and the one with the worse
perplexity is named.
"""

import math
import statistics
from pathlib import Path

from safetensors import safe_open

from mergebot.files import short_identity
from mergebot.merge.source import InputModel, open_model
from mergebot.merge.vocab import is_vocab_tensor

SAMPLE = 1 << 16
"""Elements per tensor compared (evenly strided): the relative distance of a damaged tensor shows in any even
sample, and converting every element of every parent to float32 would cost as much as the perplexity run."""
MIN_DISTANCE = 0.05
"""Relative distance below which no tensor is suspect: fine-tunes, even long ones, stay below it in most tensors,
and the outlier factor alone would flag two near-identical models whose one tensor differs by a rounding."""


def weight_suspects(
    parents: dict[str, tuple[InputModel | None, Path, str]], ppl: dict[str, float], outlier: float
) -> dict[str, str]:
    """name → why, for parents whose weights are an outlier. `parents` maps name → (the input as the merge read it
    or None, its directory, its identity); a parent with a LoRA adapter is left out (its weights are the base's)."""
    models = {}
    for name, (model, path, revision) in parents.items():
        if model is not None and model.adapter is not None:
            continue
        models[name] = (model or open_model(name, path), revision)
    if len(models) < 2:
        return {}
    far = _nearest_distances({name: model for name, (model, _) in models.items()})
    typical = statistics.median(d for per_tensor in far.values() for d in per_tensor.values()) if far else 0.0
    flagged: dict[str, tuple[str, float]] = {}
    for name, per_tensor in far.items():
        if not per_tensor:
            continue
        tensor, distance = max(per_tensor.items(), key=lambda item: item[1])
        if distance > MIN_DISTANCE and distance > outlier * typical:
            flagged[name] = (tensor, distance)
    if len(flagged) == len(models):  # symmetric: keep the worse reader of the eval text
        worst = max(flagged, key=lambda n: ppl.get(n, math.inf) if math.isfinite(ppl.get(n, math.inf)) else math.inf)
        flagged = {worst: flagged[worst]}
    return {
        name: (
            f"{name}@{short_identity(models[name][1])}: {tensor} is {distance:.2f} (relative) from the nearest other "
            f"model, {distance / max(typical, 1e-12):,.0f}x a typical tensor's {typical:.4f}; damaged weights?"
        )
        for name, (tensor, distance) in flagged.items()
    }


def _nearest_distances(models: dict[str, InputModel]) -> dict[str, dict[str, float]]:
    """Per parent, per tensor every parent holds with one shape: the relative distance to the nearest other one."""
    names = list(models)
    shared = set.intersection(*(set(m.tensors) for m in models.values()))
    if not _same_vocabulary(list(models.values())):  # rows of one id are not one token's: the merge aligns them
        shared = {name for name in shared if not is_vocab_tensor(name)}
    result: dict[str, dict[str, float]] = {name: {} for name in names}
    handles: dict[Path, object] = {}
    try:
        for tensor in sorted(shared):
            infos = [models[n].tensors[tensor] for n in names]
            if len({tuple(i.shape) for i in infos}) != 1 or not infos[0].dtype.torch.is_floating_point:
                continue
            values = []
            for info in infos:
                if info.file not in handles:
                    handles[info.file] = safe_open(info.file, framework="pt")
                flat = handles[info.file].get_tensor(tensor).view(-1)
                values.append(flat[:: max(1, flat.numel() // SAMPLE)].float())
            norms = [float(v.norm()) for v in values]
            for i, name in enumerate(names):
                distances = [
                    float((values[i] - values[j]).norm()) / max(norms[j], 1e-12) for j in range(len(names)) if j != i
                ]
                if all(math.isfinite(d) for d in distances):
                    result[name][tensor] = min(distances)
    finally:
        handles.clear()
    return result


def _same_vocabulary(models: list[InputModel]) -> bool:
    """Whether every model's tokenizer.json is the same file (missing in all counts as the same)."""
    contents = {
        (m.path / "tokenizer.json").read_bytes() if (m.path / "tokenizer.json").is_file() else b"" for m in models
    }
    return len(contents) == 1
