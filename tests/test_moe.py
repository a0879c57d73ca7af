"""Mixtures of experts built from small dense models: the layout each architecture loads with, routers as pure
functions, byte-identical runs, and an expert's update rewriting only its shards."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from mergebot.config.moe import MoeConfig, load_moe_config
from mergebot.dev.synthetic import make_model
from mergebot.errors import ConfigError, ModelError
from mergebot.merge.moe import run_moe
from mergebot.merge.moe_layout import choose_architecture
from mergebot.merge.moe_router import ROUTERS, RouterInputs, router_weights
from mergebot.pipeline.inputs import resolve_inputs
from tests.helpers import load_tensors, run_cli, tree_digest

SHAPE = {"hidden": 16, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 24}
PROMPTS = [("the cat sat", ""), ("a dog ran far", "the cat"), ("one two three", "")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    base = make_model(root / "base", **SHAPE, dtype=torch.float32, tie_embeddings=True)
    experts = {f"e{i}": make_model(root / f"e{i}", base=base, seed=i + 1, noise=0.2) for i in range(3)}
    return {"base": base, **experts}


def _config(
    tmp_path: Path,
    models: dict[str, Path],
    *,
    gate_mode: str = "cheap_embed",
    extra: str = "",
    expert_extra: str = "",
    shared: str | None = None,
    name: str = "moe.yml",
) -> MoeConfig:
    lines = [f"base_model: {models['base']}", f"gate_mode: {gate_mode}", extra, "experts:"]
    for index, (positive, negative) in enumerate(PROMPTS):
        lines += [f"  - source_model: {models[f'e{index}']}", f"    positive_prompts: [{positive!r}]"]
        lines += [f"    negative_prompts: [{negative!r}]"] if negative else []
        lines += [expert_extra] if expert_extra and index == 1 else []
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {models['e2']}", shared]
    path = tmp_path / name
    path.write_text("\n".join(line for line in lines if line) + "\n")
    return load_moe_config(path)


QWEN_SHARED = "    positive_prompts: ['shared words']\n    residual_scale: 0.5"


@pytest.mark.parametrize(
    ("architecture", "shared", "model_class"),
    [("mixtral", None, "MixtralForCausalLM"), ("qwen", QWEN_SHARED, "Qwen2MoeForCausalLM")],
)
def test_the_moe_loads_with_its_transformers_class(
    tmp_path: Path, models: dict[str, Path], architecture: str, shared: str | None, model_class: str
) -> None:
    from transformers import AutoModelForCausalLM

    config = _config(tmp_path, models, extra=f"architecture: {architecture}\ndtype: bfloat16", shared=shared)
    run_moe(config, resolve_inputs(config), tmp_path / "out")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(model).__name__ == model_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()


def test_the_layouts_tensors(tmp_path: Path, models: dict[str, Path]) -> None:
    """Mixtral's experts fused as transformers 5 holds them (each expert's gate_proj rows, then its up_proj rows);
    DeepSeek's and Qwen's experts under names of their own; attention and embeddings from the base."""
    base, experts = load_tensors(models["base"]), [load_tensors(models[f"e{i}"]) for i in range(3)]
    mixtral = _config(tmp_path, models, extra="architecture: mixtral", name="mixtral.yml")
    run_moe(mixtral, resolve_inputs(mixtral), tmp_path / "mixtral")
    out = load_tensors(tmp_path / "mixtral")
    layer = "model.layers.1."
    gate_up = torch.stack(
        [torch.cat([e[layer + "mlp.gate_proj.weight"], e[layer + "mlp.up_proj.weight"]]) for e in experts]
    )
    assert torch.equal(out[layer + "mlp.experts.gate_up_proj"], gate_up)
    assert torch.equal(
        out[layer + "mlp.experts.down_proj"], torch.stack([e[layer + "mlp.down_proj.weight"] for e in experts])
    )
    assert torch.equal(out[layer + "self_attn.q_proj.weight"], base[layer + "self_attn.q_proj.weight"])
    assert out[layer + "mlp.gate.weight"].shape == (3, SHAPE["hidden"])
    deepseek = _config(tmp_path, models, shared="    residual_scale: 0.5", name="deepseek.yml")  # the automatic choice
    run_moe(deepseek, resolve_inputs(deepseek), tmp_path / "deepseek")
    out = load_tensors(tmp_path / "deepseek")
    assert torch.equal(out[layer + "mlp.experts.1.up_proj.weight"], experts[1][layer + "mlp.up_proj.weight"])
    assert torch.equal(
        out[layer + "mlp.shared_experts.down_proj.weight"], experts[2][layer + "mlp.down_proj.weight"] * 0.5
    )
    assert torch.equal(out[layer + "mlp.shared_experts.up_proj.weight"], experts[2][layer + "mlp.up_proj.weight"])
    assert not any("mlp.gate_proj" in name or "shared_expert_gate" in name for name in out)
    assert '"auto_map"' not in (tmp_path / "deepseek" / "config.json").read_text()  # no remote code, as every output
    assert "auto_map" in (tmp_path / "deepseek" / "model.safetensors.index.json").read_text()  # listed as left out


def test_the_architecture_is_chosen_as_mergekit_moe_does(tmp_path: Path, models: dict[str, Path]) -> None:
    inputs = resolve_inputs(_config(tmp_path, models))
    assert choose_architecture(_config(tmp_path, models), inputs) == "Mixtral"
    assert choose_architecture(_config(tmp_path, models, shared="    residual_scale: 1"), inputs) == "DeepSeek MoE"
    assert choose_architecture(_config(tmp_path, models, shared=QWEN_SHARED), inputs) == "Qwen MoE"
    with pytest.raises(ConfigError, match=r"architecture: no output architecture holds these models \(Mixtral: no sh"):
        choose_architecture(_config(tmp_path, models, extra="architecture: mixtral", shared=QWEN_SHARED), inputs)
    with pytest.raises(ConfigError, match="Qwen MoE: exactly one shared expert"):
        choose_architecture(_config(tmp_path, models, extra="architecture: qwen"), inputs)


def test_two_runs_are_byte_identical(tmp_path: Path, models: dict[str, Path]) -> None:
    """A random router and an expert's noise are seeded: the same bytes every run (mergekit-moe's are not)."""
    config = _config(
        tmp_path, models, gate_mode="random", expert_extra="    noise_scale: 0.01", extra="dtype: bfloat16"
    )
    first = run_moe(config, resolve_inputs(config), tmp_path / "first")
    second = run_moe(config, resolve_inputs(config), tmp_path / "second")
    assert tree_digest(tmp_path / "first") == tree_digest(tmp_path / "second")
    assert first.fingerprints == second.fingerprints
    out = load_tensors(tmp_path / "first")
    routers = [out[f"model.layers.{layer}.mlp.gate.weight"].float() for layer in range(2)]
    assert not torch.equal(routers[0], routers[1])  # each layer draws its own
    assert abs(float(torch.cat(routers).std()) - 1.0) < 0.3  # standard normal, as mergekit's torch.randn
    expert = load_tensors(models["e1"])["model.layers.0.mlp.down_proj.weight"]
    noisy = out["model.layers.0.mlp.experts.down_proj"][1].float()
    assert 0.005 < float((noisy - expert).std()) < 0.02  # noise of the configured scale, in bfloat16


def test_cheap_embed_is_mergekits_formula(tmp_path: Path, models: dict[str, Path]) -> None:
    """Per expert: the normalised sum of the base's embeddings of its positive prompts' tokens (the BOS token's
    text before each prompt), minus the same of its negative prompts, normalised; the same in every layer."""
    config = _config(tmp_path, models)
    inputs = resolve_inputs(config)
    router_inputs = RouterInputs(inputs[config.base_model], config.gated, 2, SHAPE["hidden"])
    weights = router_weights("cheap_embed", router_inputs, ROUTERS)
    tokenizer = Tokenizer.from_file(str(models["base"] / "tokenizer.json"))
    embedding = load_tensors(models["base"])["model.embed_tokens.weight"].double()

    def normalised_sum(prompt: str) -> torch.Tensor:
        ids = tokenizer.encode("<s>" + prompt, add_special_tokens=False).ids
        assert ids[0] == 1 and len(ids) > 2
        total = embedding[ids].sum(dim=0)
        return total / total.norm()

    for row, (positive, negative) in enumerate(PROMPTS):
        expected = normalised_sum(positive) - (normalised_sum(negative) if negative else 0)
        expected = (expected / expected.norm()).numpy()
        for layer in (0, 1):
            np.testing.assert_allclose(weights[layer][row], expected, rtol=0, atol=1e-6)
    assert weights[0].dtype == np.float32


def test_an_expert_update_rewrites_only_its_shards(tmp_path: Path, models: dict[str, Path]) -> None:
    """Qwen and DeepSeek keep each expert in shards of its own, and the router's shard depends on the base and the
    prompts: a new revision of one expert rewrites its shards alone; the base's rewrites its own and the routers."""
    copies = {}
    for name, path in models.items():
        copies[name] = tmp_path / "inputs" / name
        copies[name].mkdir(parents=True)
        for file in path.iterdir():
            (copies[name] / file.name).write_bytes(file.read_bytes())
    config = _config(tmp_path, copies, extra="out_shard_size: 4KB", shared=QWEN_SHARED)
    first = run_moe(config, resolve_inputs(config), tmp_path / "out")
    assert first.computed == first.shards and len(first.shards) > 5
    holding = _shards_holding(tmp_path / "out")
    _update(copies["e1"])
    second = run_moe(config, resolve_inputs(config), tmp_path / "out")
    assert second.shards == first.shards
    assert second.computed == sorted(holding["mlp.experts.1."])
    assert set(second.reused) == set(first.shards) - set(second.computed)
    _update(copies["base"])
    third = run_moe(config, resolve_inputs(config), tmp_path / "out")
    assert third.computed == sorted(holding["base"] | holding["router"])
    rebuilt = run_moe(config, resolve_inputs(config), tmp_path / "fresh")
    assert tree_digest(tmp_path / "fresh") == tree_digest(tmp_path / "out")
    assert rebuilt.fingerprints == third.fingerprints


def _shards_holding(out_dir: Path) -> dict[str, set[str]]:
    weight_map = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    kinds = {
        "mlp.experts.1.": lambda name: "mlp.experts.1." in name,
        "base": lambda name: ".mlp." not in name,
        "router": lambda name: name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")),
    }
    return {kind: {file for name, file in weight_map.items() if test(name)} for kind, test in kinds.items()}


def _update(model_dir: Path) -> None:
    """A new revision: every tensor of the checkpoint a little changed."""
    tensors = {name: tensor * 1.01 for name, tensor in load_tensors(model_dir).items()}
    (model_dir / "model.safetensors").unlink()
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def test_an_expert_of_another_shape_is_refused(tmp_path: Path, models: dict[str, Path]) -> None:
    other = make_model(tmp_path / "wide", **{**SHAPE, "intermediate": 32}, dtype=torch.float32, tie_embeddings=True)
    config = _config(tmp_path, {**models, "e1": other})
    with pytest.raises(ModelError, match=r"mlp\..*_proj.weight: shape \[.*\] in model .*wide does not match"):
        run_moe(config, resolve_inputs(config), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mergebot_merge_builds_a_moe_from_its_file(tmp_path: Path, models: dict[str, Path]) -> None:
    """The command line tells a mergekit-moe file from a merge; the output records the config as run."""
    from mergebot.merge.engine import MERGE_CONFIG_FILE

    config = _config(tmp_path, models)
    assert run_cli("merge", tmp_path / "moe.yml", tmp_path / "out") == 0
    recorded = load_moe_config(tmp_path / "out" / MERGE_CONFIG_FILE)
    assert replace(recorded, source=config.source) == config
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 3


def test_a_killed_build_resumes_from_its_finished_shards(tmp_path: Path, models: dict[str, Path]) -> None:
    """What a kill leaves (finished shards in the hidden work directory, one shard half written) is picked up: the
    finished shards are kept, the rest computed, and the result is the same bytes."""
    config = _config(tmp_path, models, extra="out_shard_size: 4KB", shared=QWEN_SHARED)
    whole = run_moe(config, resolve_inputs(config), tmp_path / "whole")
    work = tmp_path / ".out.partial"
    (tmp_path / "whole").rename(work)
    last = work / whole.shards[-1]
    last.rename(last.with_name(last.name + ".tmp"))
    (work / "config.json").unlink()
    resumed = run_moe(config, resolve_inputs(config), tmp_path / "out")
    assert resumed.computed == [whole.shards[-1]] and resumed.reused == whole.shards[:-1]
    assert not work.exists()
    fresh = run_moe(config, resolve_inputs(config), tmp_path / "fresh")
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "fresh") and fresh.computed == fresh.shards
