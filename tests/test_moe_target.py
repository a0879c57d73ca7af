"""A daemon target naming a mergekit-moe config: read as a mixture of experts whose every model is an input, hashed
with its prompts, told on the card and in the commit message expert by expert, and gated against the base and the
experts."""

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from mergebot.config.daemon import ValidateSettings, load_daemon_config
from mergebot.config.moe import MoeConfig, load_moe_config
from mergebot.dev.synthetic import make_model
from mergebot.merge.moe import run_moe
from mergebot.merge.source import InputModel
from mergebot.pipeline.card import commit_message, model_card
from mergebot.pipeline.inputs import resolve_inputs
from mergebot.pipeline.moe_hidden import ALL_ROUTERS
from mergebot.pipeline.report import Check, ValidationReport, format_report
from mergebot.pipeline.run import check_merge

SHA = "0123456789abcdef0123456789abcdef01234567"
MOE = """base_model: org/base
gate_mode: hidden
experts:
  - source_model: org/ft1
    positive_prompts: ["sow <b>seeds</b> | then water"]
    negative_prompts: ["snow", "hail"]
  - source_model: target:upstream
    positive_prompts: ["rain"]
"""
SHARED = "shared_experts:\n  - source_model: {path}/ft1\n    positive_prompts: [sow the seeds]\n"


def daemon_config(tmp_path: Path, moe: str = MOE):
    (tmp_path / "moe.yml").write_text(moe)
    (tmp_path / "mergebot.toml").write_text(
        '[daemon]\nstate_dir = "state"\n'
        '[[targets]]\nname = "upstream"\nrepo = "me/upstream"\nmerge_method = "linear"\n'
        'models = [{ model = "org/ft1", parameters = { weight = 1.0 } }]\n'
        '[[targets]]\nname = "moe"\nrepo = "me/moe"\nmergekit_config = "moe.yml"\n'
    )
    return load_daemon_config(tmp_path / "mergebot.toml")


def test_a_target_naming_a_mergekit_moe_config_watches_every_model_and_hashes_the_prompts(tmp_path):
    config = daemon_config(tmp_path)
    target = config.targets["moe"]
    assert isinstance(target.merge, MoeConfig)
    assert [spec.model for spec in target.merge.models] == ["org/base", "org/ft1", "target:upstream"]
    assert target.reads == ("upstream",)
    assert list(config.targets) == ["upstream", "moe"]
    changed = daemon_config(tmp_path, MOE.replace('["rain"]', '["rain", "storm"]')).targets["moe"]
    assert changed.config_hash != target.config_hash


def test_the_card_lists_each_expert_with_its_revision_and_prompts(tmp_path):
    moe = daemon_config(tmp_path).targets["moe"].merge
    merged = moe.pinned({"org/base": (SHA, None), "org/ft1": ("f" * 40, None)})
    report = ValidationReport(out_dir=tmp_path, checks=[Check("load", True, "")], merge_ppl=12.5)
    card = ModelCard(model_card(merged, report, []))
    assert set(card.data.base_model) == {"org/base", "org/ft1", "target:upstream"}
    assert "# Mixture of experts" in card.text
    assert f"org/base at `{SHA}`" in card.text
    row = f"| 0 | org/ft1 | `{'f' * 40}` | &quot;sow &lt;b&gt;seeds&lt;/b&gt; \\| then water&quot; | "
    assert row + "&quot;snow&quot;<br>&quot;hail&quot; |" in card.text
    assert "| 1 | target:upstream | `local` | &quot;rain&quot; |  |" in card.text
    assert commit_message(merged) == (
        f"mergebot: mixture of 2 experts (hidden router) of org/base@{SHA[:12]}, org/ft1@ffffffffffff, "
        "target:upstream@local"
    )


def build(tmp_path: Path, architecture: str, shared: str) -> dict[str, InputModel]:
    """MOE on small local models, built into tmp_path/out; its input models."""
    base = make_model(tmp_path / "base", hidden=16, layers=2, heads=2, kv_heads=1, intermediate=24)
    for number in (1, 2):
        make_model(tmp_path / f"ft{number}", base=base, seed=number)
    moe = MOE.replace("org/", f"{tmp_path}/").replace("target:upstream", f"{tmp_path}/ft2")
    (tmp_path / "moe.yml").write_text(f"{moe}architecture: {architecture}\n{shared.format(path=tmp_path)}")
    config = load_moe_config(tmp_path / "moe.yml")
    models = resolve_inputs(config)
    run_moe(config, models, tmp_path / "out", routers=ALL_ROUTERS)
    return models


@pytest.mark.parametrize(
    ("architecture", "shared", "model_class"),
    [("mixtral", "", "MixtralForCausalLM"), ("qwen", SHARED, "Qwen2MoeForCausalLM")],
    ids=["mixtral", "qwen"],
)
def test_the_gate_loads_the_mixture_and_judges_it_against_base_and_experts(tmp_path, architecture, shared, model_class):
    models = build(tmp_path, architecture, shared)
    report = check_merge(tmp_path / "out", models, ValidateSettings(), None)
    assert report.passed, format_report(report)
    assert f"{model_class}, 2 layers" in next(check.detail for check in report.checks if check.name == "config")
    assert {parent.name for parent in report.parents} == {f"{tmp_path}/{name}" for name in ("base", "ft1", "ft2")}
    assert report.merge_ppl is not None and set(report.kl) == {parent.name for parent in report.parents}


def test_an_expert_missing_from_a_qwen_mixture_fails_the_tensor_check(tmp_path):
    """Qwen MoE experts are saved one by one and fused by transformers while loading: the gate checks that they
    fuse into the parameter's shape."""
    models = build(tmp_path, "qwen", SHARED)
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    gone = "model.layers.1.mlp.experts.1.up_proj.weight"
    shard = tmp_path / "out" / index["weight_map"].pop(gone)
    tensors = load_file(shard)
    del tensors[gone]
    save_file(tensors, shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    report = check_merge(tmp_path / "out", models, ValidateSettings(), None)
    check = next(check for check in report.checks if check.name == "tensors")
    assert not check.passed
    assert check.detail == (
        "wrong shape: model.layers.1.mlp.experts.gate_up_proj from 3 tensors: they do not stack (config implies "
        "[2, 48, 16])"
    )


def test_a_mixtral_with_its_experts_saved_one_by_one_passes_the_tensor_check(tmp_path):
    """The layout of the Mixtrals on the Hub (`block_sparse_moe.experts.N.w1`, `w2`, `w3`), which transformers
    renames and fuses while loading: the same mixture in it passes as the fused one does."""
    models = build(tmp_path, "mixtral", "")
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in sorted(set(index["weight_map"].values())):
        tensors = {}
        for name, tensor in load_file(tmp_path / "out" / file).items():
            del index["weight_map"][name]
            prefix, _, kind = name.partition(".mlp.")
            if kind == "experts.gate_up_proj":
                for expert, (gate, up) in enumerate(pair.chunk(2, dim=0) for pair in tensor):
                    tensors |= {f"{prefix}.block_sparse_moe.experts.{expert}.w1.weight": gate.contiguous()}
                    tensors |= {f"{prefix}.block_sparse_moe.experts.{expert}.w3.weight": up.contiguous()}
            elif kind == "experts.down_proj":
                tensors |= {f"{prefix}.block_sparse_moe.experts.{e}.w2.weight": t for e, t in enumerate(tensor)}
            else:
                tensors[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = tensor
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, tmp_path / "out" / file)
        index["weight_map"] |= dict.fromkeys(tensors, file)
    index_path.write_text(json.dumps(index))
    report = check_merge(tmp_path / "out", models, ValidateSettings(), None)
    assert report.passed, format_report(report)
    assert "block_sparse_moe.experts.1.w3.weight" in index_path.read_text()
