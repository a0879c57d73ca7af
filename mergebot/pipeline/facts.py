"""What a user notices before any weight is multiplied: the chat template, the end-of-turn and end-of-sequence ids,
and the config fields that change the numerics, read from a model's files with no model run.

Each model's findings are a flat `facts` mapping (field → value as text), so the gate compares them across the
merge and its parents, and the daemon compares each input's with what it had at the last publish. Ids are written
with their token ("2 <|im_end|>"): two vocabularies may number the same token differently, and a reader of a hold
reason wants the token.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mergebot.pipeline.perplexity import load_tokenizer, one_line

NUMERICS_FIELDS = (
    "rope_theta", "rope_scaling", "partial_rotary_factor", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
    "norm_eps", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "hidden_activation",
    "sliding_window", "tie_word_embeddings", "max_position_embeddings", "attn_logit_softcapping",
    "final_logit_softcapping", "query_pre_attn_scalar", "attention_bias", "mlp_bias",
)  # fmt: skip
"""config.json fields that change what the same weights compute: two parents that disagree on one were trained to
different numerics, and the merge can follow only one of them. `rope_parameters` (transformers 5) is read by its
keys (`rope_theta`, `rope_parameters.rope_type`, ...)."""
EOS_FIELDS = ("config.eos_token_id", "generation_config.eos_token_id", "tokenizer.eos_token", "chat_template.turn_end")
TEMPLATE_FIELD = "chat_template"
# Text the template renders that is meant to be one special token: <|im_start|>, <s>, </s>, <start_of_turn>,
# [|endofturn|]. Plain words ("### Response:") and bracketed text ("[INST]" in Llama 2) are not required to be.
_MARKER = re.compile(r"<\|[^<>|\s]{1,48}\|>|</?[A-Za-z_][\w.-]{0,47}>|\[\|[\w.-]{1,48}\|\]")
_CONTENT = "mergebot-probe-{}"


@dataclass
class ModelFacts:
    """One model's files as the gate reads them: `facts` for comparing, `problems` found inside the model alone,
    and what the probe needs (the ids generation stops at, the token that ends an assistant turn)."""

    name: str
    facts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    turn_end_id: int | None = None
    tokenizer: PreTrainedTokenizerBase | None = None


def read_facts(name: str, model_dir: Path) -> ModelFacts:
    """Everything `consistency_checks` compares, for one checkpoint directory."""
    result = ModelFacts(name)
    config = _json(model_dir / "config.json", result)
    generation = (
        _json(model_dir / "generation_config.json", result) if (model_dir / "generation_config.json").exists() else {}
    )
    try:
        result.tokenizer = load_tokenizer(model_dir)
    except Exception as exc:  # transformers raises many types for a bad tokenizer; all mean "unusable"
        result.problems.append(f"tokenizer cannot be loaded ({one_line(exc)})")
    for key, value in numerics(config).items():
        result.facts[key] = json.dumps(value, sort_keys=True)
    tokenizer = result.tokenizer
    config_eos, generation_eos = _ids(config.get("eos_token_id")), _ids(generation.get("eos_token_id"))
    result.stop_ids = generation_eos or config_eos
    if tokenizer is None:
        return result
    result.facts["config.eos_token_id"] = _shown(config_eos, tokenizer)
    if generation:
        result.facts["generation_config.eos_token_id"] = _shown(generation_eos, tokenizer)
    eos_token = tokenizer.eos_token
    if eos_token is not None:
        result.facts["tokenizer.eos_token"] = _shown([tokenizer.convert_tokens_to_ids(eos_token)], tokenizer)
    _check_eos(result, config_eos, generation_eos, eos_token, vocab_rows(config))
    if tokenizer.chat_template:
        _read_template(result, tokenizer, vocab_rows(config))
    return result


def numerics(config: dict[str, Any]) -> dict[str, Any]:
    """The NUMERICS_FIELDS a config.json sets, its text model's (`text_config.`) too."""
    found: dict[str, Any] = {}
    for prefix, table in (("", config), ("text_config.", config.get("text_config"))):
        if not isinstance(table, dict):
            continue
        for key in NUMERICS_FIELDS:
            if table.get(key) is not None:
                found[prefix + key] = table[key]
        rope = table.get("rope_parameters")
        if isinstance(rope, dict):
            for key, value in rope.items():
                found[prefix + (key if key == "rope_theta" else f"rope_parameters.{key}")] = value
    return found


def vocab_rows(config: dict[str, Any]) -> int | None:
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return rows if isinstance(rows, int) else None


def _json(path: Path, result: ModelFacts) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        result.problems.append(f"{path.name} unreadable ({exc})")
        return {}
    if not isinstance(value, dict):
        result.problems.append(f"{path.name} is not a JSON object")
        return {}
    return value


def _ids(value: Any) -> list[int]:
    """eos_token_id as a list of ids (it may be one id or a list); anything else counts as none."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _shown(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    if not ids:
        return "none"
    return ", ".join(
        f"{i} {tokenizer.convert_ids_to_tokens(i) if 0 <= i < len(tokenizer) else '(no such id)'}" for i in ids
    )


def _check_eos(
    result: ModelFacts, config_eos: list[int], generation_eos: list[int], eos_token: str | None, rows: int | None
) -> None:
    """The end-of-sequence ids of the three files agree with each other and are rows of the embedding."""
    tokenizer = result.tokenizer
    assert tokenizer is not None
    if not result.stop_ids:
        result.problems.append("no eos_token_id in config.json or generation_config.json: generation never stops")
    for where, ids in (("config.json", config_eos), ("generation_config.json", generation_eos)):
        bad = [i for i in ids if i < 0 or i >= min(len(tokenizer), rows or len(tokenizer))]
        if bad:
            result.problems.append(f"{where} eos_token_id {bad} is not a token of its vocabulary")
    if config_eos and generation_eos and not set(config_eos) & set(generation_eos):
        result.problems.append(
            f"eos_token_id differs: config.json {_shown(config_eos, tokenizer)}, "
            f"generation_config.json {_shown(generation_eos, tokenizer)}"
        )
    if eos_token is not None and result.stop_ids:
        eos_id = tokenizer.convert_tokens_to_ids(eos_token)
        if eos_id not in set(config_eos) | set(generation_eos):
            result.problems.append(
                f"tokenizer eos_token {eos_token} ({eos_id}) is not an eos_token_id of config.json or "
                f"generation_config.json ({_shown(result.stop_ids, tokenizer)})"
            )


def _read_template(result: ModelFacts, tokenizer: PreTrainedTokenizerBase, rows: int | None) -> None:
    """Render a conversation with the model's chat template (transformers renders it sandboxed), then check the
    markers it emits are single tokens and that an assistant turn ends with a token generation stops at."""
    result.facts[TEMPLATE_FIELD] = hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:12]
    texts = [_CONTENT.format(i) for i in range(4)]
    conversation = [
        {"role": "user", "content": texts[0]},
        {"role": "assistant", "content": texts[1]},
        {"role": "user", "content": texts[2]},
    ]
    try:
        rendered = render(tokenizer, conversation, add_generation_prompt=True)
    except Exception as exc:  # a template that raises or is not valid Jinja: any error means it cannot be used
        result.problems.append(f"chat template does not render a user/assistant/user conversation ({one_line(exc)})")
        return
    missing = [t for t in texts[:3] if t not in rendered]
    if missing:
        result.problems.append(f"chat template drops message text ({', '.join(missing)} not in its output)")
        return
    markup = re.split("|".join(re.escape(t) for t in texts[:3]), rendered)
    split = sorted({m for part in markup for m in _MARKER.findall(part) if not _single_token(tokenizer, m, rows)})
    if split:
        result.problems.append(f"chat template emits {', '.join(split)}, not single tokens of its vocabulary")
    after = markup[2].lstrip()  # what follows the assistant's message, up to the next user message
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        result.problems.append("chat template ends an assistant turn with nothing: no token to stop at")
        return
    result.turn_end_id = ids[0]
    token = tokenizer.convert_ids_to_tokens(ids[0])
    result.facts["chat_template.turn_end"] = f"{ids[0]} {token}"
    if ids[0] not in result.stop_ids:
        result.problems.append(
            f"chat template ends an assistant turn with {ids[0]} {token}, but generation stops at "
            f"{_shown(result.stop_ids, tokenizer)}"
        )


def render(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def _single_token(tokenizer: PreTrainedTokenizerBase, marker: str, rows: int | None) -> bool:
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id and (rows is None or ids[0] < rows)
