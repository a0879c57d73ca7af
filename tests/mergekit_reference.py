"""mergekit itself as the reference: the same YAML text merged by `mergekit-yaml` and by mergebot, tensors compared.

Users arrive with mergekit configs and compare results with mergekit, so where mergekit is deterministic the tests
compare with the real thing (mergekit 0.1.5 in its own venv: `.venv-mergekit` beside the checkout, or the venv
named by $MERGEBOT_MERGEKIT_VENV). Without it, the `mergekit` fixture skips the test and says how to get it.

A test module registers its cases (`register`) when imported and names tests/mergekit_fixtures.py in
`pytest_plugins`. Its session fixture `mergekit` merges every case with mergekit in one process of the venv
(tests/mergekit_driver.py: a Python start with torch and transformers costs seconds, a tiny merge milliseconds);
each test then merges its case with mergebot in the test process (the code under `mergebot merge`) and compares.

The inputs are tiny float32 Llama checkpoints whose deltas from the base have distinct magnitudes (a shuffled
grid, spaced far wider than float32 rounding of `model - base`), so no result hinges on how a top-k breaks ties;
mergekit computes in float32 for float32 models, so both sides agree to float32 precision.
"""

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mergebot.config.merge import load_merge_config
from mergebot.dev.synthetic import make_model
from mergebot.merge.engine import run_merge
from mergebot.pipeline.inputs import resolve_inputs
from tests.helpers import load_tensors

VENV_VARIABLE = "MERGEBOT_MERGEKIT_VENV"
DEFAULT_VENV = Path(__file__).resolve().parent.parent / ".venv-mergekit"
DRIVER = Path(__file__).resolve().parent / "mergekit_driver.py"
SHAPE = {"hidden": 16, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 24}
MODEL_SETS: dict[str, dict[str, Any]] = {
    "dense": {},
    # half of each delta exactly zero (different places per model): some entries change in one model, some in
    # several, some in none, which is what RAM tells apart
    "sparse": {"zero_fraction": 0.5, "seed": 3},
}
"""`write_models` options per set of models a case can use; each set is a base and three fine-tunes."""
CASES: dict[str, tuple[str, str]] = {}
"""Every comparison of the session, by name: (its set of models, its YAML with {base}, {m1}... for their paths)."""


def mergekit_python() -> Path:
    """The Python of the mergekit venv, or a skip saying why it is missing."""
    venv = Path(os.environ.get(VENV_VARIABLE) or DEFAULT_VENV)
    command = venv / "bin" / "mergekit-yaml"
    if not command.exists():
        pytest.skip(
            f"mergekit is not installed: no {command} (create that venv with `pip install mergekit==0.1.5`, "
            f"or point {VENV_VARIABLE} at one)"
        )
    return venv / "bin" / "python"


def register(configs: dict[str, str], header: str, models: str = "dense") -> list[str]:
    """Add YAML templates (each `header` + its config) to the session's mergekit run, merged from the set `models`
    of MODEL_SETS; returns their names, sorted, to parametrize a test with."""
    for name, config in configs.items():
        if name in CASES:
            raise ValueError(f"two mergekit comparison cases are named {name!r}")
        CASES[name] = (models, header + config)
    return sorted(configs)


def listed(*entries: str | tuple[str, str]) -> str:
    """A `models:` list for a template: a model alone, or (model, its parameters in YAML flow style)."""
    lines = ["models:"]
    for entry in entries:
        model, parameters = (entry, "") if isinstance(entry, str) else entry
        lines.append(f"  - model: {{{model}}}" + (f"\n    parameters: {{{{{parameters}}}}}" if parameters else ""))
    return "\n".join(lines) + "\n"


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


@dataclass(frozen=True)
class Reference:
    """mergekit's output for every registered case: `root/<case>/mergekit`, merged from `root/<case>/merge.yml`."""

    root: Path
    models: dict[str, dict[str, Path]]
    """Each set's models, as the templates name them: {"base": ..., "m1": ..., "m2": ..., "m3": ...}."""

    def run_both(self, case: str, work: Path) -> Outputs:
        """Merge `case` with mergebot into `work/mergebot` and pair it with mergekit's output of the same file."""
        error = self.root / case / "mergekit.error"
        assert not error.exists(), f"mergekit failed:\n{error.read_text()[-4000:]}"
        config = load_merge_config(self.root / case / "merge.yml")
        run_merge(config, resolve_inputs(config), work / "mergebot")
        return Outputs(mergekit=load_tensors(self.root / case / "mergekit"), mergebot=load_tensors(work / "mergebot"))


def merge_with_mergekit(root: Path) -> Reference:
    """Write the models and every case's config under `root`, and merge them all in one mergekit process."""
    mergekit_python()  # skips before building models in vain
    models = {}
    for name in sorted({model_set for model_set, _ in CASES.values()}):
        base, *fine_tunes = write_models(root / "models" / name, 3, **MODEL_SETS[name])
        models[name] = {"base": base, **{f"m{number}": path for number, path in enumerate(fine_tunes, 1)}}
    merge_all_with_mergekit(root, {case: template.format(**models[name]) for case, (name, template) in CASES.items()})
    return Reference(root, models)


def merge_all_with_mergekit(root: Path, configs: dict[str, str]) -> None:
    """Each YAML text as `root/<case>/merge.yml`, merged into `root/<case>/mergekit` by one mergekit process (a
    case that fails leaves `root/<case>/mergekit.error`, which `Reference.run_both` reports)."""
    python = mergekit_python()
    arguments = []
    for case, text in configs.items():
        (root / case).mkdir()
        (root / case / "merge.yml").write_text(text)
        arguments += [str(root / case / "merge.yml"), str(root / case / "mergekit")]
    driver = subprocess.run(
        [python, DRIVER, *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=1800,
    )
    assert driver.returncode == 0, f"{DRIVER.name} failed ({driver.returncode}):\n{driver.stderr[-4000:]}"
