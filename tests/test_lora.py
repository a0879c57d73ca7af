"""mergekit's `model+lora` inputs: a PEFT LoRA adapter, written here as PEFT saves one, applied while merging. The
merge reads W + scale · B @ A wherever the adapter targets W, exactly as if the adapter had been merged into a
dense copy first; an adapter update recomputes only the shards it touches; an adapter mergebot cannot apply
exactly is refused, naming it; and the same merge runs from the Hub (`org/base+org/adapter`) and with mergekit."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

from mergebot.config.daemon import ValidateSettings, load_daemon_config
from mergebot.config.merge import load_merge_config
from mergebot.daemon.state import State
from mergebot.daemon.watch import Upstream
from mergebot.dev.synthetic import make_model
from mergebot.files import local_identity
from mergebot.hub.client import HubClient
from mergebot.pipeline.inputs import identities, resolve_inputs
from mergebot.pipeline.parents import Parent, parent_results
from mergebot.pipeline.perplexity import DEFAULT_WINDOW
from tests.helpers import load_tensors, run_cli, tree_digest
from tests.mergekit_reference import mergekit_python

SHAPE = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 48}
MODULES = ("q_proj", "v_proj")


def write_adapter(
    path: Path,
    base: Path,
    *,
    modules: tuple[str, ...] = MODULES,
    rank: int = 4,
    alpha: float = 8,
    seed: int = 0,
    config: dict | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA adapter for `base` as PEFT saves one (adapter_config.json, adapter_model.safetensors with
    base_model.model.<module>.lora_A/B.weight), random A and B for `modules` of every layer; returns, per
    checkpoint tensor, (A, B) for the expected values."""
    weights = load_tensors(base)
    generator = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, weight in sorted(weights.items()):
        module = name.removesuffix(".weight")
        if module.rpartition(".")[2] not in modules:
            continue
        a = torch.randn(rank, weight.shape[1], generator=generator) * 0.1
        b = torch.randn(weight.shape[0], rank, generator=generator) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        factors[name] = (a, b)
    settings = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    } | (config or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(settings, indent=2))
    save_file(tensors | (extra or {}), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return factors


def dense(base: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scale) -> dict[str, torch.Tensor]:
    """The base's tensors with W + scale(name) · B @ A where the adapter targets W, in float32."""
    tensors = load_tensors(base)
    for name, (a, b) in factors.items():
        tensors[name] = tensors[name].float() + scale(name) * (b @ a)
    return tensors


def write_dense(path: Path, base: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the base checkpoint with `tensors` as its weights (the adapter applied beforehand)."""
    shutil.copytree(base, path)
    for shard in path.glob("*.safetensors"):
        shard.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path / "model.safetensors"), {"format": "pt"})
    return path


def linear_of(tmp_path: Path, model: str, name: str = "linear.yml", shard: str = "5GB") -> Path:
    config = tmp_path / name
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters:\n      weight: 1.0\n"
        f"dtype: float32\nout_shard_size: {shard}\n"
    )
    return config


@pytest.fixture
def base(tmp_path) -> Path:
    return make_model(tmp_path / "base", **SHAPE, dtype=torch.float32, shard_size=30_000)


@pytest.mark.parametrize(
    "settings, scale",
    [
        ({}, lambda name: 8 / 4),
        ({"use_rslora": True}, lambda name: 8 / math.sqrt(4)),
        ({"alpha_pattern": {"v_proj": 2}}, lambda name: (2 if "v_proj" in name else 8) / 4),
    ],
    ids=["lora", "rslora", "alpha_pattern"],
)
def test_a_lora_input_reads_as_the_dense_update(base, tmp_path, settings, scale):
    factors = write_adapter(tmp_path / "adapter", base, config=settings)
    config = linear_of(tmp_path, f"{base}+{tmp_path / 'adapter'}")
    assert run_cli("merge", config, tmp_path / "out") == 0
    merged, expected, plain = load_tensors(tmp_path / "out"), dense(base, factors, scale), load_tensors(base)
    assert sorted(merged) == sorted(expected)
    assert len(factors) == SHAPE["layers"] * len(MODULES)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(merged[name], plain[name]) == (name not in factors), name


def test_ties_with_a_lora_input_equals_ties_with_the_adapter_applied_first(base, tmp_path):
    fine_tune = make_model(tmp_path / "ft", base=base, seed=3, dtype=torch.float32)
    factors = write_adapter(tmp_path / "adapter", base, modules=("q_proj", "v_proj", "down_proj"), seed=5)
    applied = write_dense(tmp_path / "applied", base, dense(base, factors, lambda name: 2.0))
    outputs = {}
    for label, model in (("lora", f"{base}+{tmp_path / 'adapter'}"), ("dense", applied)):
        config = tmp_path / f"{label}.yml"
        config.write_text(
            f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {model}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
            f"  - model: {fine_tune}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
            "dtype: float32\n"
        )
        assert run_cli("merge", config, tmp_path / label) == 0
        outputs[label] = load_tensors(tmp_path / label)
    assert sorted(outputs["lora"]) == sorted(outputs["dense"])
    for name, tensor in outputs["dense"].items():
        torch.testing.assert_close(outputs["lora"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert "model.layers.0.mlp.down_proj.weight" in factors


def shard_outcomes(capsys) -> dict[str, str]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if '"shard"' in line]
    return {line["shard"]: line["outcome"] for line in lines}


def test_an_adapter_update_recomputes_the_shards_it_touches(base, tmp_path, capsys):
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    write_adapter(adapter, base, modules=("q_proj",))
    config = linear_of(tmp_path, f"{base}+{adapter}", shard="30KB")
    assert run_cli("merge", config, out) == 0
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {weight_map[f"model.layers.{layer}.self_attn.q_proj.weight"] for layer in range(SHAPE["layers"])}
    assert len(set(weight_map.values())) > len(touched)
    capsys.readouterr()
    write_adapter(adapter, base, modules=("q_proj",), seed=9)  # new A and B
    assert run_cli("merge", config, out) == 0
    outcomes = shard_outcomes(capsys)
    assert {shard for shard, outcome in outcomes.items() if outcome == "computed"} == touched
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(settings | {"lora_alpha": 16}))  # same weights
    assert run_cli("merge", config, out) == 0
    assert {shard for shard, outcome in shard_outcomes(capsys).items() if outcome == "computed"} == touched
    assert run_cli("merge", config, out) == 0
    assert set(shard_outcomes(capsys).values()) == {"reused"}


def test_modules_to_save_replace_the_base_tensor(base, tmp_path):
    head = torch.randn(load_tensors(base)["lm_head.weight"].shape, generator=torch.Generator().manual_seed(2))
    write_adapter(
        tmp_path / "adapter",
        base,
        config={"modules_to_save": ["lm_head"]},
        extra={"base_model.model.lm_head.weight": head},
    )
    assert run_cli("merge", linear_of(tmp_path, f"{base}+{tmp_path / 'adapter'}"), tmp_path / "out") == 0
    assert torch.equal(load_tensors(tmp_path / "out")["lm_head.weight"], head)


REFUSED = {
    "dora": ({"use_dora": True}, {}, "DoRA (use_dora) is not supported"),
    "bias": ({"bias": "lora_only"}, {}, "trained biases (bias = 'lora_only') is not supported"),
    "ia3": ({"peft_type": "IA3"}, {}, "a IA3 adapter; mergebot applies LoRA adapters only"),
    "embedding": (
        {},
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)},
        "tensor base_model.model.model.embed_tokens.lora_embedding_A is not a LoRA A/B weight",
    ),
    "unknown module": (
        {},
        {"base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight": torch.zeros(4, 32),
         "base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight": torch.zeros(32, 4)},
        "it changes model.layers.0.self_attn.x_proj.weight, which model",
    ),
    "unsaved full weight": (
        {},
        {"base_model.model.lm_head.weight": torch.zeros(8, 32)},
        "tensor base_model.model.lm_head.weight is not a LoRA A/B weight or one of modules_to_save",
    ),
    "resized modules_to_save": (
        {"modules_to_save": ["lm_head"]},
        {"base_model.model.lm_head.weight": torch.zeros(8, 32)},
        "its lm_head.weight has shape [8, 32]",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_adapter_it_cannot_apply_is_refused_naming_it(base, tmp_path, capsys, case):
    settings, extra, message = REFUSED[case]
    adapter = tmp_path / "adapter"
    write_adapter(adapter, base, config=settings, extra=extra)
    assert run_cli("merge", linear_of(tmp_path, f"{base}+{adapter}"), tmp_path / "out") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"mergebot: error: adapter {adapter}: ") and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_pickle_only_adapter_is_refused(base, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    write_adapter(adapter, base)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert run_cli("merge", linear_of(tmp_path, f"{base}+{adapter}"), tmp_path / "out") == 2
    assert f"adapter {adapter}: only pickle weights (adapter_model.bin)" in capsys.readouterr().err


def test_a_model_named_as_the_adapter_is_refused(base, tmp_path, capsys):
    other = make_model(tmp_path / "other", **SHAPE, base=base, seed=1)
    assert run_cli("merge", linear_of(tmp_path, f"{base}+{other}"), tmp_path / "out") == 2
    assert f"adapter {other}: no adapter_config.json in {other}" in capsys.readouterr().err


def test_the_gate_measures_a_lora_parent_with_its_adapter(tmp_path):
    base = make_model(tmp_path / "base", **SHAPE, dtype=torch.float32)
    factors = write_adapter(tmp_path / "adapter", base, alpha=64)
    applied = write_dense(tmp_path / "applied", base, dense(base, factors, lambda name: 16.0))
    config = load_merge_config(linear_of(tmp_path, f"{base}+{tmp_path / 'adapter'}"))
    models = resolve_inputs(config)
    (name,) = models
    assert identities(models)[name] == f"{local_identity(base)}+{local_identity(tmp_path / 'adapter')}"
    text = ValidateSettings().eval_text.read_text()
    parents = {
        "lora": Parent(base, "a", models[name]),
        "applied": Parent(applied, "b"),
        "base": Parent(base, "c"),
    }
    results = {r.name: r.ppl for r in parent_results(parents, text, DEFAULT_WINDOW, 2, "m", None)}
    assert results["lora"] == pytest.approx(results["applied"], rel=1e-4)
    assert abs(results["lora"] - results["base"]) > 1e-3 * results["base"]


def test_model_plus_adapter_from_the_hub_equals_the_local_merge(devhub, monkeypatch, base, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", devhub.url)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    write_adapter(tmp_path / "adapter", base)
    (tmp_path / "adapter" / "README.md").write_text("# an adapter\n")
    api = HfApi(endpoint=devhub.url, token="test-token")
    for repo, folder in (("org/base", base), ("org/adapter", tmp_path / "adapter")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    local, hub = tmp_path / "local", tmp_path / "hub"
    assert run_cli("merge", "--method", "linear", f"{base}+{tmp_path / 'adapter'}:1", local) == 0
    devhub.reset_stats()
    assert run_cli("merge", "--method", "linear", "org/base+org/adapter:1", hub) == 0
    assert set(devhub.stats()["bytes_served"]["org/adapter"]) == {"adapter_config.json", "adapter_model.safetensors"}
    local_files, hub_files = tree_digest(local), tree_digest(hub)
    assert local_files.pop("mergebot_config.yml") != hub_files.pop("mergebot_config.yml")  # names differ
    assert local_files == hub_files
    head = {repo: api.model_info(repo).sha for repo in ("org/base", "org/adapter")}
    pinned = f"org/base@{head['org/base']}+org/adapter@{head['org/adapter']}"
    assert pinned in (hub / "mergebot_config.yml").read_text()


def test_the_same_lora_merge_as_mergekit(tmp_path):
    """mergekit applies the adapter with peft (merge_and_unload) into a model it saves, then merges that: the same
    numbers, and proof that the adapter written here is one peft reads."""
    python = mergekit_python()
    base = make_model(tmp_path / "base", **SHAPE, dtype=torch.float32)
    fine_tune = make_model(tmp_path / "ft", base=base, seed=4, dtype=torch.float32)
    write_adapter(tmp_path / "adapter", base, config={"use_rslora": True, "alpha_pattern": {"v_proj": 3}})
    config = tmp_path / "ties.yml"
    config.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{tmp_path / 'adapter'}\n    parameters: {{weight: 0.8}}\n"
        f"  - model: {fine_tune}\n    parameters: {{weight: 0.4}}\n"
        "dtype: float32\n"
    )
    command = [python.parent / "mergekit-yaml", config, tmp_path / "mergekit", "--lora-merge-cache", tmp_path / "lc"]
    mergekit = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert mergekit.returncode == 0, mergekit.stderr[-4000:]
    assert run_cli("merge", config, tmp_path / "mergebot") == 0
    expected, actual = load_tensors(tmp_path / "mergekit"), load_tensors(tmp_path / "mergebot")
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_the_daemon_watches_the_adapter_as_part_of_the_input(devhub, base, tmp_path):
    """A target's `base+adapter` input is known by both revisions; what a merge reads from the adapter repo (its
    weights and its config) makes the target due, a README commit does not."""
    write_adapter(tmp_path / "adapter", base)
    api = HfApi(endpoint=devhub.url, token="test-token")
    shas = {}
    for repo, folder in (("org/base", base), ("org/adapter", tmp_path / "adapter")):
        api.create_repo(repo)
        shas[repo] = api.upload_folder(repo_id=repo, folder_path=folder).oid
    config = tmp_path / "mergebot.toml"
    config.write_text(
        '[daemon]\nstate_dir = "state"\n[[targets]]\nname = "t"\nrepo = "me/t"\nmerge_method = "linear"\n'
        'models = [{ model = "org/base+org/adapter", parameters = { weight = 1 } }]\n'
    )
    target = load_daemon_config(config).targets["t"]
    hub = HubClient(endpoint=devhub.url, token="test-token")
    with State.open(tmp_path / "state") as state:
        upstream = Upstream(state)
        first = upstream.check(target, hub, {})
        assert first.shas == {"org/base+org/adapter": f"{shas['org/base']}+{shas['org/adapter']}"}
        devhub.commit_files("org/adapter", {"README.md": b"# the card only\n"})
        assert upstream.check(target, hub, {}).digests == first.digests
        settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) | {"lora_alpha": 32}
        devhub.commit_files("org/adapter", {"adapter_config.json": json.dumps(settings).encode()})
        assert upstream.check(target, hub, {}).digests != first.digests
