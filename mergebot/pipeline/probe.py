"""The behaviour probe: does the model end its turn? A few chat prompts, rendered with the model's own chat template,
go through it as one batch, greedy, with a bound on new tokens: the share that stop at a token its generation config
stops at. And, cheaper and less noisy, teacher-forced: the probability it gives its end-of-turn token right after
a short reference answer. Perplexity on raw text sees neither: a merge whose end-of-turn row was lost reads text
as well as its parents and never stops talking.
"""

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mergebot.errors import ConfigError
from mergebot.pipeline.facts import ModelFacts, render

DEFAULT_PROMPTS = Path(__file__).parent.parent / "data" / "probe.json"
MAX_NEW_TOKENS = 16
"""Each reference answer is a few tokens; a model that has not ended its turn after 16 rambles (its parents, probed
with the same bound, show how often a healthy model does)."""
_MAX_PROMPTS = 64
_MAX_CHARS = 2000
_PROBE_VERSION = 1


@dataclass(frozen=True)
class Prompt:
    prompt: str
    answer: str


@dataclass(frozen=True)
class ProbeResult:
    """Per prompt: whether the model stopped within MAX_NEW_TOKENS, and its end-of-turn probability after the
    reference answer."""

    stopped: list[bool]
    eot_prob: list[float]

    @property
    def stop_rate(self) -> float:
        return sum(self.stopped) / len(self.stopped)

    @property
    def mean_eot_prob(self) -> float:
        return sum(self.eot_prob) / len(self.eot_prob)


def read_prompts(path: Path) -> list[Prompt]:
    """The probe's prompts: a JSON list of {"prompt": ..., "answer": ...} (1 to 64, each text up to 2000 chars)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the probe prompts ({exc})") from exc
    if not isinstance(raw, list) or not 1 <= len(raw) <= _MAX_PROMPTS:
        raise ConfigError(f"{path}: the probe prompts must be a JSON list of 1 to {_MAX_PROMPTS} objects")
    prompts = []
    for index, item in enumerate(raw):
        texts = [item.get(key) if isinstance(item, dict) else None for key in ("prompt", "answer")]
        if not all(isinstance(t, str) and 0 < len(t.strip()) <= _MAX_CHARS for t in texts) or len(item) != 2:
            raise ConfigError(
                f"{path}: item {index}: needs exactly a non-empty 'prompt' and 'answer' of at most {_MAX_CHARS} chars"
            )
        prompts.append(Prompt(*texts))
    return prompts


def probe_digest(prompts: list[Prompt]) -> str:
    """How a probe result was measured, as one digest: the prompts, the token bound and this recipe."""
    text = json.dumps([[p.prompt, p.answer] for p in prompts]) + f"\0{MAX_NEW_TOKENS}\0{_PROBE_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


def run_probe(model: torch.nn.Module, facts: ModelFacts, prompts: list[Prompt]) -> ProbeResult | None:
    """The probe on a loaded model with its own template and stop ids; None when it has no chat template, no
    end-of-turn token or nothing to stop at (the consistency checks say so).

    The model is cast to float32 in place (the caller drops it after): decoding runs the model once per new token,
    and casting each module's weights on every step (`in_float32`) costs more than the step; 4 bytes per parameter
    for the few seconds the probe runs."""
    tokenizer = facts.tokenizer
    if tokenizer is None or not tokenizer.chat_template or facts.turn_end_id is None or not facts.stop_ids:
        return None
    model.float()
    prompt_ids, answer_ids = probe_ids(tokenizer, prompts)
    with torch.inference_mode():
        return _run(model, prompt_ids, answer_ids, facts.stop_ids, facts.turn_end_id)


def probe_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt as one user turn rendered with the model's chat template, and its reference answer, as ids (the
    answer tokenized after the prompt where that keeps the prompt's tokens, as a model would have produced it)."""
    prompt_ids, answer_ids = [], []
    for p in prompts:
        text = render(tokenizer, [{"role": "user", "content": p.prompt}], add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        joint = tokenizer(text + p.answer, add_special_tokens=False)["input_ids"]
        same_prefix = joint[: len(ids)] == ids and len(joint) > len(ids)
        prompt_ids.append(ids)
        answer_ids.append(
            joint[len(ids) :] if same_prefix else tokenizer(p.answer, add_special_tokens=False)["input_ids"]
        )
    return prompt_ids, answer_ids


def _run(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]], stop_ids: list[int], turn_end: int
) -> ProbeResult:
    """One left-padded prefill of the prompts; from a copy of its cache, the reference answers teacher-forced (the
    end-of-turn probability after each); from the cache itself, greedy decoding until every row has emitted a stop
    id or MAX_NEW_TOKENS are out."""
    width = max(len(row) for row in prompts)
    ids = torch.full((len(prompts), width), stop_ids[0], dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for index, row in enumerate(prompts):
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, next_logits = out.cache, out.logits[:, -1]
    eot = _teacher_forced(model, copy.deepcopy(cache), mask, positions[:, -1], answers, turn_end, stop_ids[0])
    stops = torch.tensor(stop_ids)
    stopped = torch.zeros(len(prompts), dtype=torch.bool)
    last = positions[:, -1]
    for _ in range(MAX_NEW_TOKENS):
        token = next_logits.argmax(-1)
        stopped |= torch.isin(token, stops)
        if bool(stopped.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        last = last + 1
        out = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            cache=cache,
            use_cache=True,
        )
        cache, next_logits = out.cache, out.logits[:, -1]
    return ProbeResult([bool(s) for s in stopped], eot)


def _teacher_forced(
    model: torch.nn.Module,
    cache: object,
    mask: torch.Tensor,
    last: torch.Tensor,
    answers: list[list[int]],
    turn_end: int,
    pad: int,
) -> list[float]:
    """P(end-of-turn | prompt, reference answer): the answers right-padded after the prompts' cache."""
    width = max(len(row) for row in answers)
    ids = torch.full((len(answers), width), pad, dtype=torch.long)
    answer_mask = torch.zeros(len(answers), width, dtype=torch.long)
    for index, row in enumerate(answers):
        ids[index, : len(row)] = torch.tensor(row)
        answer_mask[index, : len(row)] = 1
    positions = last[:, None] + torch.arange(1, width + 1)
    full_mask = torch.cat([mask, answer_mask], dim=1)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=cache).logits
    ends = torch.tensor([len(row) - 1 for row in answers])
    probs = torch.softmax(logits[torch.arange(len(answers)), ends].float(), dim=-1)[:, turn_end]
    return [float(p) for p in probs]
