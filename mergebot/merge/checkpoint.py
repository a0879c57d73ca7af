"""Per-shard fingerprints: a finished shard is reused only when exactly the same inputs and settings made it.

The fingerprint is stored in the shard's own safetensors metadata, and a shard only gets its final name once it
is complete and fsynced, so "a file with the final name and the right fingerprint" is the whole checkpoint.
"""

import hashlib
import json
from pathlib import Path

from mergebot.errors import ModelError
from mergebot.merge.io import read_header
from mergebot.merge.plan import Plan, ShardPlan
from mergebot.merge.source import InputModel
from mergebot.merge.vocab import is_vocab_tensor

FINGERPRINT_KEY = "mergebot.fingerprint"
FORMAT_VERSION = 1


def shard_fingerprint(plan: Plan, shard: ShardPlan, models: dict[str, InputModel]) -> str:
    """hash(method, the parameters that touch the shard, and per input tensor: its file's sha256 and name)."""
    tensors = []
    for tensor in shard.tensors:
        inputs = []
        for ref in tensor.inputs:
            model = models[ref.model]
            info = model.tensors[ref.tensor]
            row_map = plan.row_map(tensor, ref.model, info)
            inputs.append(
                {
                    "tensor": ref.tensor,
                    "sha256": model.sha256_of(info),
                    "rows": hashlib.sha256(row_map.tobytes()).hexdigest() if row_map is not None else None,
                }
            )
        entry = {
            "name": tensor.output.name,
            "dtype": tensor.output.dtype.name,
            "shape": list(tensor.output.shape),
            "parameters": dict(tensor.params.values),
            "per_model": [dict(p) for p in tensor.params.per_model],
            "inputs": inputs,
        }
        vocab = plan.vocab.fingerprint() if is_vocab_tensor(tensor.output.name) else None
        tensors.append(entry | ({"vocab": vocab} if vocab else {}))
    document = {"format": FORMAT_VERSION, "method": plan.method.name, "shard": shard.file_name, "tensors": tensors}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def finished_with(path: Path, fingerprint: str) -> bool:
    """True when `path` is a complete shard made from exactly these inputs."""
    if not path.exists():
        return False
    try:
        _, metadata = read_header(path)
    except ModelError:
        return False
    return metadata.get(FINGERPRINT_KEY) == fingerprint
