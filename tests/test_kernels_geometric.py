"""The fused loops of sce, ram, ramplus_tl, model_stock, nuslerp, multislerp, karcher and nearswap give the same
bytes as their torch definitions, the same with one thread or two, and a merge with them never imports torch."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergebot.dev.synthetic import make_model
from mergebot.merge.methods import BUILTIN_METHODS, RawBlocks, TensorParams
from tests.helpers import tree_digest
from tests.test_kernels import deltas_of

OWN = ["sce", "ram", "ramplus_tl", "model_stock", "nuslerp", "multislerp", "karcher", "nearswap"]
"""The methods whose fused loops these tests hold (test_kernels.py holds the others')."""
BITS = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}


def test_every_method_here_has_fused_loops():
    assert all(BUILTIN_METHODS[name].fused is not None for name in OWN)


def inputs_of(seed: int, models: int, dtype: torch.dtype, shape: tuple[int, ...], tied: bool = False) -> list:
    """deltas_of's base and fine-tunes, cut or reshaped to `shape`."""
    inputs = deltas_of(seed, models, torch.float32, tied)
    size = int(np.prod(shape))
    return [tensor.reshape(-1)[:size].reshape(shape).to(dtype) for tensor in inputs]


def both_ways(
    name: str,
    inputs: list[torch.Tensor],
    values: dict,
    per_model: list[dict],
    out_dtype: torch.dtype = torch.bfloat16,
    block_rows: int = 97,
) -> tuple[np.ndarray, np.ndarray]:
    """The torch definition's output bits and the fused loops', on the same row blocks."""
    method = BUILTIN_METHODS[name]
    params = TensorParams(
        "model.layers.0.mlp.up_proj.weight",
        {**method.parameters, **values},
        tuple({**method.model_parameters, **p} for p in per_model),
    )
    shape = tuple(inputs[0].shape)
    rows = shape[0]
    step = block_rows if len(shape) > 1 else rows
    starts = range(0, rows, step)
    as_bits = BITS[inputs[0].dtype]

    def float_blocks():
        return ((s, [t[s : s + step].to(torch.float32) for t in inputs]) for s in starts)

    def raw_blocks():
        for s in starts:
            yield s, np.stack([t[s : s + step].reshape(-1).view(as_bits[0]).numpy().view(as_bits[1]) for t in inputs])

    expected = torch.cat([block.to(out_dtype) for block in method.merge(float_blocks, params)])
    expected_bits = expected.reshape(-1).view(BITS[out_dtype][0]).numpy().view(BITS[out_dtype][1])
    raw = RawBlocks(raw_blocks, shape, as_bits[1], BITS[out_dtype][1])
    return expected_bits, np.concatenate(list(method.fused(raw, params)))


def assert_same(expected: np.ndarray, fused: np.ndarray) -> None:
    assert fused.dtype == expected.dtype and fused.shape == expected.shape
    assert np.array_equal(fused, expected), f"{int((fused != expected).sum())} entries differ"


WEIGHTS = [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}]
CASES = [
    ("sce", 3, {}, []),
    ("sce", 3, {"select_topk": 0.4}, []),
    ("sce", 3, {"select_topk": 0.0}, []),
    ("ram", 3, {}, []),
    ("ram", 3, {"epsilon": 0.004}, []),
    ("ramplus_tl", 3, {"epsilon": 0.004, "r": 0.5, "alpha": 0.9}, []),
    ("ramplus_tl", 2, {}, []),
    ("model_stock", 3, {}, []),
    ("model_stock", 2, {"filter_wise": True}, []),
    ("nuslerp", 2, {}, WEIGHTS[:2]),
    ("nuslerp", 2, {"nuslerp_flatten": False}, WEIGHTS[:2]),
    ("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, WEIGHTS[:2]),
    ("multislerp", 3, {}, WEIGHTS),
    ("multislerp", 1, {}, WEIGHTS[:1]),
    ("karcher", 3, {}, []),
    ("nearswap", 1, {"t": 0.004}, []),
]


@pytest.mark.parametrize(("name", "models", "values", "per_model"), CASES)
@pytest.mark.parametrize("tied", [False, True], ids=["random", "tied"])
@pytest.mark.parametrize("shape", [(300, 700), (5000,)], ids=["matrix", "vector"])
def test_fused_loops_give_the_torch_definitions_bytes(name, models, values, per_model, tied, shape):
    inputs = inputs_of(7, models, torch.bfloat16, shape, tied)
    if name == "nearswap":
        inputs = inputs[:2]
    per_model = per_model or [{}] * models
    assert_same(*both_ways(name, inputs, values, per_model))


@pytest.mark.parametrize("name", ["nuslerp", "multislerp"])
def test_without_a_base(name):
    inputs = inputs_of(9, 3, torch.bfloat16, (300, 700))[1:3]
    assert_same(*both_ways(name, inputs, {"nuslerp_flatten": False} if name == "nuslerp" else {}, WEIGHTS[:2]))


@pytest.mark.parametrize("name", ["sce", "ramplus_tl", "model_stock", "karcher", "nearswap"])
def test_in_float32_and_other_block_sizes(name):
    inputs = inputs_of(11, 1 if name == "nearswap" else 3, torch.float32, (233, 900))
    values = {"t": 0.01} if name == "nearswap" else {"select_topk": 0.7} if name == "sce" else {}
    per_model = [{}] * (len(inputs) - 1)
    for out_dtype, block_rows in ((torch.float32, 300), (torch.bfloat16, 13)):
        assert_same(*both_ways(name, inputs, values, per_model, out_dtype, block_rows))


def test_the_tensor_grams_do_not_depend_on_the_blocks():
    """The whole-tensor sums run on a grid of their own: any blocking gives the same bytes."""
    inputs = inputs_of(13, 3, torch.bfloat16, (300, 700))
    outputs = {
        block_rows: both_ways("model_stock", inputs, {}, [{}] * 3, block_rows=block_rows)[1]
        for block_rows in (7, 97, 300)
    }
    assert np.array_equal(outputs[7], outputs[97]) and np.array_equal(outputs[97], outputs[300])


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Models whose large tensors (embeddings, MLP) are matrices, whose norms are vectors, all fused."""
    root = tmp_path_factory.mktemp("geometric-family")
    base = make_model(root / "base", hidden=128, intermediate=640, vocab=1024, layers=2, shard_size=400_000)
    return base, [make_model(root / f"ft{seed}", base=base, seed=seed) for seed in (1, 2)]


def sources(name: str, base: Path, tunes: list[Path]) -> list[str]:
    if name == "nearswap":
        return ["--base-model", str(base), str(tunes[0]), "--set", "t=0.001"]
    if name in ("nuslerp", "multislerp"):
        return [f"{tune}:0.5" for tune in tunes]
    return ["--base-model", str(base), *map(str, tunes)]


@pytest.mark.process
@pytest.mark.parametrize("name", OWN)
def test_a_merge_imports_no_torch_and_gives_the_same_bytes_on_one_thread_or_two(family, tmp_path, name):
    base, tunes = family
    digests = []
    for threads in ("1", "2"):
        out = tmp_path / f"out-{threads}"
        result = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "mergebot.cli",
                "merge",
                "--method",
                name,
                *sources(name, base, tunes),
                str(out),
            ],
            capture_output=True,
            text=True,
            env=os.environ | {"MERGEBOT_THREADS": threads},
        )
        assert result.returncode == 0, result.stderr[-2000:]
        imported = {
            line.rpartition("|")[2].strip() for line in result.stderr.splitlines() if line.startswith("import time")
        }
        assert "numba" in imported
        assert "torch" not in imported
        digests.append(tree_digest(out))
    assert digests[0] == digests[1]
