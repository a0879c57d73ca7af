"""Merges of models with different vocabularies: the `tokenizer` block, legacy `tokenizer_source`, and the output's
tokenizer as transformers loads it, against hand-computed rows and against mergekit 0.1.5 itself."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, LlamaForCausalLM

from mergebot.config.chat_templates import CHAT_TEMPLATES
from mergebot.config.merge import load_merge_config
from mergebot.dev.synthetic import base_vocabulary, make_model
from mergebot.errors import ConfigError
from tests.helpers import load_tensors, read_json, run_cli, tree_digest
from tests.mergekit_reference import SHAPE, Reference, merge_all_with_mergekit, mergekit_python

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A 64-token base; two fine-tunes adding tokens (<think> in both); an unrelated model with 80 plain tokens."""
    root = tmp_path_factory.mktemp("family")
    base = make_model(root / "base", **SHAPE, vocab=64, dtype=torch.float32)
    return {
        "base": base,
        "left": make_model(root / "left", base=base, seed=1, noise=0.3, extra_tokens=["<think>", "</think>"]),
        "right": make_model(root / "right", base=base, seed=2, noise=0.3, extra_tokens=["<tool>", "<think>"]),
        "wide": make_model(root / "wide", **SHAPE, vocab=80, dtype=torch.float32, seed=3),
    }


def merge(work: Path, text: str, name: str = "merge.yml") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    (work / name).write_text(text)
    out = work / "out"
    assert run_cli("merge", work / name, out) == 0
    return out


def vocab_rows(model_dir: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """token → id as transformers loads the tokenizer, and the vocabulary tensors (lm_head for tied models too)."""
    tensors = load_tensors(model_dir)
    return AutoTokenizer.from_pretrained(model_dir).get_vocab(), {
        n: tensors.get(n, tensors[EMBED]) for n in (EMBED, HEAD)
    }


def assert_loads_with_no_empty_row(out: Path, token_count: int) -> None:
    """transformers loads tokenizer and model; ids fit the rows; vocab_size is the row count; no row zero or NaN."""
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == token_count == max(tokenizer.get_vocab().values()) + 1
    model = LlamaForCausalLM.from_pretrained(out)
    rows = model.model.embed_tokens.weight.shape[0]
    assert read_json(out / "config.json")["vocab_size"] == rows >= token_count
    for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
        assert torch.isfinite(weight).all()
        assert (weight.abs().sum(dim=1) > 0).all()
    logits = model(torch.tensor([list(range(token_count - 4, token_count))])).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == rows


UNION = """
merge_method: linear
dtype: float32
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 1.0}}
  - model: {left}
    parameters: {{weight: 1.0}}
  - model: {right}
    parameters: {{weight: 2.0}}
tokenizer:
  source: union
  tokens:
    "<new>": {{source: {{kind: model_token, model: {left}, token: "<think>"}}}}
    "a": {{source: {right}, force: true}}
    "<z>": {{source: {{kind: zero}}}}
    "<blank>": {{}}
  pad_to_multiple_of: 16
"""


def test_union_rows_follow_the_token_rules(family, tmp_path):
    out = merge(tmp_path, UNION.format(**family))
    vocab, merged = vocab_rows(out)
    assert [vocab[t] for t in ("<think>", "</think>", "<tool>", "<new>", "<z>", "<blank>")] == list(range(64, 70))
    assert_loads_with_no_empty_row(out, 70)
    (_, base), (left_vocab, left), (right_vocab, right) = (vocab_rows(family[m]) for m in ("base", "left", "right"))
    for name, rows in merged.items():
        assert rows.shape[0] == 80
        b, lt, r = base[name], left[name], right[name]
        shared = torch.arange(64) != vocab["a"]
        torch.testing.assert_close(rows[:64][shared], ((b + lt[:64] + 2 * r[:64]) / 4)[shared])
        # <think>: base lacks it, so it takes no part: left and right, weights renormalized.
        torch.testing.assert_close(rows[64], (lt[left_vocab["<think>"]] + 2 * r[right_vocab["<think>"]]) / 3)
        assert torch.equal(rows[65], lt[left_vocab["</think>"]])  # only left has it
        assert torch.equal(rows[66], r[right_vocab["<tool>"]])
        assert torch.equal(rows[67], lt[left_vocab["<think>"]])  # model_token
        assert torch.equal(rows[vocab["a"]], r[right_vocab["a"]])  # forced, though every model has "a"
        mean = rows[:68].mean(0)  # linear: each model's mean row, merged, is the mean of the merged rows
        for row in range(68, 80):  # <z>, <blank> (no model has it) and the padding
            torch.testing.assert_close(rows[row], mean)
    assert read_json(out / "tokenizer_config.json") == read_json(family["base"] / "tokenizer_config.json")


def test_union_of_plain_vocabularies_with_the_legacy_key(family, tmp_path):
    """tokenizer_source: union; wide's 16 extra words (plain vocabulary entries) are appended in id order."""
    text = "merge_method: linear\ndtype: float32\ntokenizer_source: union\nparameters: {weight: 1.0}\n"
    text += f"models:\n  - model: {family['base']}\n"
    out = merge(tmp_path, text + f"  - model: {family['wide']}\n")
    vocab, merged = vocab_rows(out)
    wide_vocab, wide = vocab_rows(family["wide"])
    assert vocab == wide_vocab
    assert_loads_with_no_empty_row(out, 80)
    for name in (EMBED, HEAD):
        assert torch.equal(merged[name][64:], wide[name][64:])
    words = " ".join(base_vocabulary(80)[62:67])
    assert (
        AutoTokenizer.from_pretrained(out)(words).input_ids
        == AutoTokenizer.from_pretrained(family["wide"])(words).input_ids
    )


def test_a_model_as_source_keeps_its_tokenizer_files(family, tmp_path):
    text = (
        f"merge_method: linear\ndtype: float32\nparameters: {{weight: 1.0}}\ntokenizer: {{source: {family['right']}}}\n"
    )
    text += "models:\n"
    out = merge(tmp_path, text + "".join(f"  - model: {family[m]}\n" for m in ("base", "left", "right")))
    assert (out / "tokenizer.json").read_bytes() == (family["right"] / "tokenizer.json").read_bytes()
    assert_loads_with_no_empty_row(out, 66)
    vocab, merged = vocab_rows(out)
    _, right = vocab_rows(family["right"])
    assert torch.equal(merged[EMBED][vocab["<tool>"]], right[EMBED][vocab["<tool>"]])


def test_tokens_beyond_the_embedding_are_dropped(family, tmp_path):
    """A tokenizer with an id past its embedding rows: the output vocabulary leaves it out, as mergekit strips it."""
    ghost = make_model(tmp_path / "ghost", base=family["base"], seed=4)
    tokenizer = Tokenizer.from_file(str(ghost / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken("<ghost>", normalized=False)])
    tokenizer.save(str(ghost / "tokenizer.json"))
    text = f"merge_method: linear\nparameters: {{weight: 1.0}}\ntokenizer:\n  source: base\nbase_model: {ghost}\n"
    text += f"models:\n  - model: {ghost}\n"
    out = merge(tmp_path, text + f"  - model: {family['base']}\n")
    assert "<ghost>" not in AutoTokenizer.from_pretrained(out).get_vocab()
    assert_loads_with_no_empty_row(out, 64)


KIT_CASES = {
    "union": """
merge_method: linear
dtype: float32
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {left}
    parameters: {{weight: 0.3}}
  - model: {wide}
    parameters: {{weight: 0.2}}
tokenizer:
  source: union
  tokens:
    "<new>": {{source: {{kind: model_token, model: {wide}, token_id: 70}}}}
    "1": {{source: {left}, force: true}}
  pad_to_multiple_of: 32
chat_template: chatml
""",
    "base_source": """
merge_method: task_arithmetic
dtype: float32
base_model: {base}
models:
  - model: {left}
    parameters: {{weight: 0.7}}
  - model: {right}
    parameters: {{weight: 0.4}}
tokenizer:
  source: base
  tokens:
    "a": {{source: {left}, force: true}}
  pad_to_multiple_of: 48
""",
}
"""Where mergekit is deterministic, and every token a model lacks has one donor (mergebot's weighting differs only
where several models have it)."""


@pytest.fixture(scope="module")
def kit(family, tmp_path_factory) -> Reference:
    """mergekit's output of each of KIT_CASES on the family, merged in one process of its venv."""
    root = tmp_path_factory.mktemp("kit")
    merge_all_with_mergekit(root, {case: text.format(**family) for case, text in KIT_CASES.items()})
    return Reference(root, {"family": family})


def test_union_matches_mergekit(kit, tmp_path):
    """Every row of every token, and the padding, as mergekit builds them (tokens compared by string: mergekit's
    order of a union's new tokens changes from run to run); the chat template renders the same."""
    kit.run_both("union", tmp_path)
    sides = {"mergekit": kit.root / "union" / "mergekit", "mergebot": tmp_path / "mergebot"}
    (kit_vocab, kit_rows), (bot_vocab, bot_rows) = (vocab_rows(path) for path in sides.values())
    assert kit_vocab.keys() == bot_vocab.keys() and len(kit_vocab) == 64 + 16 + 2 + 1
    for name in (EMBED, HEAD):
        assert kit_rows[name].shape == bot_rows[name].shape == (96, SHAPE["hidden"])
        for token, row in kit_vocab.items():
            torch.testing.assert_close(bot_rows[name][bot_vocab[token]], kit_rows[name][row], msg=f"{name} {token!r}")
        torch.testing.assert_close(bot_rows[name][len(kit_vocab) :], kit_rows[name][len(kit_vocab) :])
    rendered = [
        AutoTokenizer.from_pretrained(path).apply_chat_template(CHAT, tokenize=False) for path in sides.values()
    ]
    assert rendered[0] == rendered[1]


def test_base_source_task_arithmetic_matches_mergekit(kit, tmp_path):
    outputs = kit.run_both("base_source", tmp_path)
    outputs.assert_close()
    assert outputs.mergebot[EMBED].shape[0] == 96
    assert_loads_with_no_empty_row(tmp_path / "mergebot", 64)


def test_changing_a_token_source_recomputes_the_embedding(family, tmp_path):
    """The token settings are part of the shard fingerprint, so a re-merge does not keep a stale row; the same
    config merges to the same bytes."""
    text = UNION.format(**family) + "out_shard_size: 4KB\n"  # a shard per tensor
    out = merge(tmp_path / "first", text)
    again = merge(tmp_path / "again", text)
    assert tree_digest(out) == tree_digest(again)
    changed = text.replace(f'"a": {{source: {family["right"]}', f'"a": {{source: {family["left"]}')
    (tmp_path / "first" / "changed.yml").write_text(changed)
    assert run_cli("merge", tmp_path / "first" / "changed.yml", out) == 0
    vocab, merged = vocab_rows(out)
    left_vocab, left = vocab_rows(family["left"])
    assert torch.equal(merged[EMBED][vocab["a"]], left[EMBED][left_vocab["a"]])


@pytest.mark.parametrize(
    ("block", "key", "message"),
    [
        ("tokenizer: {source: base}\ntokenizer_source: base", "tokenizer", "not both"),
        ("tokenizer: {source: nobody}", "tokenizer.source", "not one of the models"),
        ("tokenizer: {pad_to_multiple_of: 0}", "tokenizer.pad_to_multiple_of", "1 or more"),
        ("tokenizer: {tokens: {'<x>': {force: true}}}", "tokenizer.tokens.<x>.force", "needs a source"),
        ("tokenizer: {tokens: {'<x>': {source: {kind: one}}}}", "tokenizer.tokens.<x>.source.kind", "'zero'"),
        (
            "tokenizer: {tokens: {'<x>': {source: {kind: model_token, model: M, token_id: 1, token: a}}}}",
            "tokenizer.tokens.<x>.source",
            "exactly one",
        ),
        ("chat_template: chatmlx", "chat_template", "not 'auto', one of alpaca, chatml"),
    ],
)
def test_bad_tokenizer_settings_name_key_and_line(family, tmp_path, block, key, message):
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: passthrough\nmodels:\n  - model: {family['base']}\n{block.replace('M', str(family['base']))}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_merge_config(config)
    assert f"{config}:4: {key}: " in str(error.value) and message in str(error.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{left}", "model {left} has no '<x>'"),
        ("{{kind: model_token, model: {left}, token_id: 66}}", "row 66 is beyond"),
        ("{{kind: model_token, model: {right}, token: a}}", "takes no input from model {right}"),
    ],
)
def test_token_sources_checked_before_merging(family, tmp_path, capsys, source, message):
    config = tmp_path / "merge.yml"
    models = "".join(f"  - model: {family[m]}\n" for m in ("base", "left"))
    source = source.format(**family)
    tokens = f"tokenizer:\n  tokens:\n    '<x>': {{source: {source}}}\n"
    header = f"merge_method: linear\nparameters: {{weight: 1.0}}\nbase_model: {family['right']}\n"
    config.write_text(f"{header}models:\n{models}{tokens}")
    assert run_cli("merge", config, tmp_path / "out") == 2
    assert message.format(**family) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


RENDERED = {
    "alpaca": "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
    "### Instruction:\nBye\n\n### Response:\n",
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]Bye\n"
    "[|assistant|]",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] Be brief.\n\nHi there [/INST] Hello!</s> [INST] Bye [/INST]",
}


def with_template(model: Path, template: str | list) -> Path:
    """The model with `template` as tokenizer_config.json's chat_template."""
    config = read_json(model / "tokenizer_config.json")
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return model


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_named_chat_templates_render_their_format(family, tmp_path, name):
    """Written to chat_template.jinja (the source's template in tokenizer_config.json dropped) and rendered by
    transformers' own apply_chat_template."""
    base = with_template(make_model(tmp_path / "base", base=family["base"], seed=5), "{{ 'old' }}")
    text = f"merge_method: linear\nparameters: {{weight: 1.0}}\nchat_template: {name}\nmodels:\n  - model: {base}\n"
    out = merge(tmp_path, text + f"  - model: {family['left']}\n")
    assert "chat_template" not in read_json(out / "tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == RENDERED[name]
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_auto_takes_the_template_most_models_share(family, tmp_path):
    """Read where transformers reads it (chat_template.jinja first, or tokenizer_config.json, a named list's
    "default"), compared stripped, as mergekit does; with no template anywhere the source's files stay."""
    shared = "{% for message in messages %}<{{ message.role }}>{{ message.content }}{% endfor %}"
    paths = [make_model(tmp_path / f"m{i}", base=family["base"], seed=10 + i) for i in range(3)]
    with_template(paths[0], "{{ 'first model only' }}")
    (paths[1] / "chat_template.jinja").write_text(f"\n  {shared}\n")
    named = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": shared}]
    with_template(paths[2], named)
    text = "merge_method: linear\nparameters: {weight: 1.0}\nchat_template: auto\nmodels:\n"
    out = merge(tmp_path / "auto", text + "".join(f"  - model: {p}\n" for p in paths))
    assert (out / "chat_template.jinja").read_text() == shared
    assert (
        AutoTokenizer.from_pretrained(out).apply_chat_template(CHAT[:2], tokenize=False)
        == "<system>Be brief.<user>Hi there"
    )
    plain = merge(tmp_path / "none", text + f"  - model: {family['base']}\n  - model: {family['left']}\n")
    assert not (plain / "chat_template.jinja").exists()
    assert tree_digest(plain)["tokenizer_config.json"] == tree_digest(family["base"])["tokenizer_config.json"]


def test_jinja_template_in_a_toml_target(family, tmp_path):
    config = tmp_path / "mergebot.toml"
    config.write_text(
        'merge_method = "linear"\nparameters = { weight = 1.0 }\n'
        'chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\\n{% endfor %}"\n'
        f'models = [{{ model = "{family["base"]}" }}, {{ model = "{family["left"]}" }}]\n'
    )
    assert run_cli("merge", config, tmp_path / "out") == 0
    rendered = AutoTokenizer.from_pretrained(tmp_path / "out").apply_chat_template(CHAT[:2], tokenize=False)
    assert rendered == "[system] Be brief.\n[user] Hi there\n"


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_formats_without_stray_whitespace_render_as_mergekit_files(family, name):
    """mergekit's own files for these two render the same text (its llama3, alpaca and exaone files add newlines
    and indentation that the formats do not have)."""
    files = sorted(mergekit_python().parents[1].glob("lib/python*/site-packages/mergekit/_data/chat_templates"))
    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    rendered = [
        tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True, chat_template=template)
        for template in (CHAT_TEMPLATES[name], (files[0] / f"{name}.jinja").read_text())
    ]
    assert rendered[0] == rendered[1] == RENDERED[name]
