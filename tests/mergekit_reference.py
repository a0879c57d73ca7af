"""mergekit itself as the reference: run `mergekit-yaml` and `mergebot merge` on the same YAML text, compare tensors.

Users arrive with mergekit configs and compare results with mergekit, so where mergekit is deterministic the tests
compare with the real thing (mergekit 0.1.5 in its own venv: `.venv-mergekit` beside the checkout, or the venv
named by $MERGEBOT_MERGEKIT_VENV). Without it, `mergekit_yaml()` skips the test and says how to get it.

The inputs are tiny float32 Llama checkpoints whose deltas from the base have distinct magnitudes (a shuffled
grid, spaced far wider than float32 rounding of `model - base`), so no result hinges on how a top-k breaks ties;
mergekit computes in float32 for float32 models, so both sides agree to float32 precision.
"""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergebot.dev.synthetic import make_model
from tests.helpers import load_tensors

VENV_VARIABLE = "MERGEBOT_MERGEKIT_VENV"
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".venv-mergekit"
SHAPE = {"hidden": 16, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 24}


def mergekit_yaml() -> Path:
    """The `mergekit-yaml` command of the mergekit venv, or a skip saying why it is missing."""
    venv = Path(os.environ.get(VENV_VARIABLE) or DEFAULT_VENV)
    command = venv / "bin" / "mergekit-yaml"
    if not command.exists():
        pytest.skip(
            f"mergekit is not installed: no {command} (create that venv with `pip install mergekit==0.1.5`, "
            f"or point {VENV_VARIABLE} at one)"
        )
    return command


def write_models(root: Path, count: int, *, zero_fraction: float = 0.0, seed: int = 0) -> list[Path]:
    """A float32 base (first) and `count` fine-tunes of it, each delta a shuffled grid of distinct magnitudes.

    Model i's magnitudes are rms(base tensor) × 0.2 × (1 + 0.37 i) × (1 + j / n) for a permutation j of 0..n−1,
    with random signs; `zero_fraction` of each delta (random places, different per model) is exactly zero."""
    base = make_model(root / "base", **SHAPE, dtype=torch.float32, seed=seed)
    base_tensors = load_tensors(base)
    paths = [base]
    for index in range(count):
        path = make_model(root / f"model{index + 1}", base=base, dtype=torch.float32, seed=seed + index + 1)
        generator = torch.Generator().manual_seed(1000 * seed + index)
        tensors = {
            name: tensor + _distinct_delta(tensor, 0.2 * (1 + 0.37 * index), zero_fraction, generator)
            for name, tensor in base_tensors.items()
        }
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def named_models(root: Path, count: int, **options) -> dict[str, Path]:
    """`write_models` as the names config templates use: {"base": ..., "m1": ..., "m2": ...}; skips first when
    mergekit is missing, so a module fixture builds nothing in vain."""
    mergekit_yaml()
    base, *fine_tunes = write_models(root, count, **options)
    return {"base": base, **{f"m{number}": path for number, path in enumerate(fine_tunes, 1)}}


def _distinct_delta(base: torch.Tensor, scale: float, zero_fraction: float, generator: torch.Generator) -> torch.Tensor:
    n = base.numel()
    grid = 1.0 + torch.randperm(n, generator=generator).to(torch.float64) / n
    signs = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    delta = float(base.double().square().mean().sqrt()) * scale * grid * signs
    delta[torch.rand(n, generator=generator) < zero_fraction] = 0.0
    return delta.to(torch.float32).reshape(base.shape)


@dataclass(frozen=True)
class Outputs:
    mergekit: dict[str, torch.Tensor]
    mergebot: dict[str, torch.Tensor]

    def max_abs_difference(self) -> float:
        return max(float((self.mergebot[n] - t).abs().max()) for n, t in self.mergekit.items())

    def assert_close(self, relative: float = 1e-6) -> None:
        """Same tensors, shapes and dtypes; values within `relative` × the tensor's largest magnitude (or equal)."""
        assert sorted(self.mergebot) == sorted(self.mergekit)
        for name, expected in self.mergekit.items():
            actual = self.mergebot[name]
            assert actual.dtype == expected.dtype, name
            assert torch.isfinite(actual).all(), name
            atol = relative * float(expected.abs().max())
            torch.testing.assert_close(actual, expected, rtol=relative, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def run_both(config_text: str, work: Path) -> Outputs:
    """Write `config_text` to a file and merge it with mergekit and with mergebot (both as a user runs them, side by
    side)."""
    command = mergekit_yaml()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "merge.yml"
    config.write_text(config_text)
    runs = {
        "mergekit": ([str(command), str(config), str(work / "mergekit")], {"HF_HUB_OFFLINE": "1"}),
        "mergebot": ([sys.executable, "-m", "mergebot.cli", "merge", str(config), str(work / "mergebot")], {}),
    }
    processes = {
        name: subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
        )
        for name, (argv, env) in runs.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} failed ({process.returncode}):\n{stderr[-4000:]}"
    return Outputs(**{name: load_tensors(work / name) for name in runs})
