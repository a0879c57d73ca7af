"""The consistency checks (no model run) on small synthetic checkpoints: each check refuses what it is for, names
the model and the field, and a field the user accepts may differ."""

import json
from pathlib import Path

import pytest

from mergebot.config.chat_templates import CHATML, LLAMA3
from mergebot.dev.synthetic import make_model
from mergebot.pipeline.consistency import consistency_checks
from mergebot.pipeline.facts import read_facts
from mergebot.pipeline.report import Check

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with ChatML tokens and template, whose generation stops at <|im_end|>."""
    path = make_model(tmp_path_factory.mktemp("chat") / "m", vocab=64, layers=1, extra_tokens=CHAT_TOKENS)
    set_template(path, CHATML)
    im_end = json.loads((path / "config.json").read_text())["vocab_size"] - 1
    edit(path, "config.json", eos_token_id=im_end)
    edit(path, "generation_config.json", eos_token_id=im_end)
    edit(path, "tokenizer_config.json", eos_token="<|im_end|>")
    edit(path, "special_tokens_map.json", eos_token="<|im_end|>")
    return path


def set_template(path: Path, template: str) -> None:
    (path / "chat_template.jinja").write_text(template.strip())


def edit(path: Path, name: str, **changes: object) -> None:
    data = json.loads((path / name).read_text())
    data.update(changes)
    (path / name).write_text(json.dumps(data))


def copy_of(model: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    target.mkdir()
    for file in model.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def checks(merge: Path, *parents: Path, accepted: tuple[str, ...] = ()) -> dict[str, Check]:
    facts = [read_facts(str(p), p) for p in parents]
    found = consistency_checks(read_facts("merge", merge), facts, frozenset(accepted))
    return {c.name: c for c in found}


def test_a_consistent_merge_passes_every_check(chat_model: Path, tmp_path: Path) -> None:
    parent = copy_of(chat_model, tmp_path, "parent")
    found = checks(chat_model, chat_model, parent)
    assert all(c.passed for c in found.values()), found
    assert "<|im_end|>" in found["chat template"].detail


def test_a_template_that_does_not_render_is_refused(chat_model: Path, tmp_path: Path) -> None:
    merge = copy_of(chat_model, tmp_path, "merge")
    set_template(merge, "{{ raise_exception('no system role here') }}")
    check = checks(merge, chat_model)["chat template"]
    assert not check.passed and "merge: chat template does not render" in check.detail


def test_markers_that_are_not_tokens_are_refused(chat_model: Path, tmp_path: Path) -> None:
    foreign = copy_of(chat_model, tmp_path, "foreign")
    set_template(foreign, LLAMA3)
    check = checks(chat_model, chat_model, foreign)["chat template"]
    assert not check.passed and f"{foreign}: chat template emits <|end_header_id|>" in check.detail
    assert "not single tokens" in check.detail


def test_a_turn_that_ends_where_generation_does_not_stop_is_refused(chat_model: Path, tmp_path: Path) -> None:
    merge = copy_of(chat_model, tmp_path, "merge")
    edit(merge, "generation_config.json", eos_token_id=2)
    found = checks(merge, chat_model)
    assert (
        "ends an assistant turn with" in found["chat template"].detail
        and "stops at 2 </s>" in found["chat template"].detail
    )
    assert not found["end of turn"].passed and "generation_config.eos_token_id differs" in found["end of turn"].detail


def test_eos_ids_that_disagree_inside_a_model_are_refused(chat_model: Path, tmp_path: Path) -> None:
    merge = copy_of(chat_model, tmp_path, "merge")
    edit(merge, "tokenizer_config.json", eos_token="</s>")
    edit(merge, "special_tokens_map.json", eos_token="</s>")
    check = checks(merge)["end of turn"]
    assert not check.passed and "merge: tokenizer eos_token </s> (2) is not an eos_token_id" in check.detail


def test_a_parents_eos_id_is_compared_by_field_and_can_be_accepted(chat_model: Path, tmp_path: Path) -> None:
    parent = copy_of(chat_model, tmp_path, "parent")
    edit(parent, "config.json", eos_token_id=[0, 2])
    check = checks(chat_model, chat_model, parent)["end of turn"]
    assert (
        not check.passed
        and "config.eos_token_id differs" in check.detail
        and f"{parent} 0 <unk>, 2 </s>" in check.detail
    )
    accepted = checks(chat_model, chat_model, parent, accepted=("config.eos_token_id",))["end of turn"]
    assert "config.eos_token_id" not in accepted.detail


def test_numerics_fields_must_agree_unless_accepted(chat_model: Path, tmp_path: Path) -> None:
    parent = copy_of(chat_model, tmp_path, "parent")
    config = json.loads((parent / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0
    config["rope_theta"] = 500000.0
    config["rms_norm_eps"] = 1e-3
    (parent / "config.json").write_text(json.dumps(config))
    check = checks(chat_model, chat_model, parent)["config numerics"]
    assert not check.passed
    assert f"rope_theta differs: merge 10000.0, {chat_model} 10000.0, {parent} 500000.0" in check.detail
    assert "rms_norm_eps differs" in check.detail
    accepted = checks(chat_model, chat_model, parent, accepted=("rope_theta", "rms_norm_eps"))["config numerics"]
    assert accepted.passed and "accepted to differ: rms_norm_eps, rope_theta" in accepted.detail
