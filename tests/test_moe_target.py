"""A daemon target naming a mergekit-moe config: read as a mixture of experts whose every model is an input, hashed
with its prompts, and told on the card and in the commit message expert by expert."""

from pathlib import Path

from huggingface_hub import ModelCard

from mergebot.config.daemon import load_daemon_config
from mergebot.config.moe import MoeConfig
from mergebot.pipeline.card import commit_message, model_card
from mergebot.pipeline.report import Check, ValidationReport

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
