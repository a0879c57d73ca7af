"""A GGUF file read back by llama.cpp itself (llama-cpp-python): does it load, tokenize the eval text as the merge's
tokenizer does, predict the eval text as well as the merge (perplexity over the same windows of the same ids), and
chat as the merge does with the chat template in its metadata: the same prompt tokens, the same end-of-turn
probability after each reference answer (teacher-forced, so no greedy path can wander), the merge's end-of-turn
token among those llama.cpp stops at, and free-running greedy answers that end their turn."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergebot.pipeline.perplexity import windows
from mergebot.pipeline.probe import MAX_NEW_TOKENS, Prompt


@dataclass(frozen=True)
class ChatIds:
    """The probe as the merge's tokenizer sees it: each prompt rendered by its template, each reference answer,
    and the end-of-turn token."""

    prompts: list[list[int]]
    answers: list[list[int]]
    turn_end: int


@dataclass(frozen=True)
class LlamaReadBack:
    """What llama.cpp made of the file; `problem` is one line when it could not be measured at all."""

    problem: str | None = None
    first_difference: int | None = None
    """The first eval-text token where llama.cpp's tokenization differs from the merge's (None: identical)."""
    ppl: float = math.nan
    template_differs: int | None = None
    """The first probe prompt whose rendering by the GGUF's template gives other tokens (None: all the same)."""
    turn_end_stops: bool = False
    eot_probs: tuple[float, ...] = ()
    stopped: tuple[bool, ...] = ()
    answers: tuple[str, ...] = ()


def read_back(
    path: Path,
    text: str,
    text_ids: list[int],
    ids: list[int],
    window: int,
    max_windows: int,
    prompts: list[Prompt],
    chat: ChatIds | None,
) -> LlamaReadBack:
    """Load `path` in llama.cpp (CPU, quiet); compare its tokenization of `text` with `text_ids` (the merge's,
    without special tokens); measure perplexity over `windows(ids, ...)`; run the probe's `prompts` (`chat`: the
    merge's side of it, None when the merge has no chat template)."""
    import llama_cpp

    try:
        model = llama_cpp.Llama(
            str(path),
            n_ctx=max(window, 512),
            n_batch=max(window, 512),
            logits_all=True,
            n_threads=max(1, min(4, os.cpu_count() or 1)),
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as failure:
        return LlamaReadBack(problem=f"llama.cpp cannot load it ({str(failure).splitlines()[0][:200]})")
    try:
        own = model.tokenize(text.encode(), add_bos=False, special=False)
        difference = _first_difference(own, text_ids)
        ppl = _perplexity(model, windows(ids, window, max_windows))
        if chat is None:
            return LlamaReadBack(None, difference, ppl)
        differs, eot_probs = _teacher_forced(model, prompts, chat)
        vocab = llama_cpp.llama_model_get_vocab(model.model)
        stops = bool(llama_cpp.llama_vocab_is_eog(vocab, chat.turn_end))
        stopped, answers = _free_running(model, prompts)
    finally:
        model.close()
    return LlamaReadBack(None, difference, ppl, differs, stops, eot_probs, stopped, answers)


def _first_difference(own: list[int], theirs: list[int]) -> int | None:
    difference = next((i for i, (a, b) in enumerate(zip(own, theirs, strict=False)) if a != b), None)
    if difference is None and len(own) != len(theirs):
        difference = min(len(own), len(theirs))
    return difference


def _perplexity(model: object, chunks: list[list[int]]) -> float:
    """exp of the mean next-token NLL, each window evaluated from an empty context, log-softmax in float64."""
    nll, count = 0.0, 0
    for chunk in chunks:
        model.reset()
        model.eval(chunk)
        logp = _log_softmax(np.asarray(model.scores[: len(chunk) - 1], dtype=np.float64))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return math.exp(nll / count) if count else math.nan


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _teacher_forced(model: object, prompts: list[Prompt], chat: ChatIds) -> tuple[int | None, tuple[float, ...]]:
    """Each prompt rendered by the GGUF's own template (as llama-cpp-python's chat completion renders it) against
    the merge's rendering, and P(end of turn) after the merge's prompt and reference answer."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        return 0, ()
    names = {"eos_token": model.token_eos(), "bos_token": model.token_bos()}
    specials = {
        name: model.detokenize([i], special=True).decode(errors="replace") if i >= 0 else ""
        for name, i in names.items()
    }
    formatter = Jinja2ChatFormatter(template=template, **specials)
    differs, probs = None, []
    for index, (prompt, ids, answer) in enumerate(zip(prompts, chat.prompts, chat.answers, strict=True)):
        rendered = formatter(messages=[{"role": "user", "content": prompt.prompt}]).prompt
        if differs is None and model.tokenize(rendered.encode(), add_bos=False, special=True) != ids:
            differs = index
        probs.append(_eot_prob(model, ids + answer, chat.turn_end))
    return differs, tuple(probs)


def _eot_prob(model: object, sequence: list[int], turn_end: int) -> float:
    model.reset()
    model.eval(sequence)
    logp = _log_softmax(np.asarray(model.scores[len(sequence) - 1], dtype=np.float64))
    return float(np.exp(logp[turn_end]))


def _free_running(model: object, prompts: list[Prompt]) -> tuple[tuple[bool, ...], tuple[str, ...]]:
    """Each prompt as one user turn through llama-cpp-python's chat completion with the GGUF's template, greedy,
    up to the probe's bound of new tokens: did it stop by itself (an end-of-generation token), and what it said."""
    stopped, answers = [], []
    for prompt in prompts:
        model.reset()
        result = model.create_chat_completion(
            messages=[{"role": "user", "content": prompt.prompt}],
            max_tokens=MAX_NEW_TOKENS,
            temperature=0.0,
            top_k=1,
            seed=0,
        )
        choice = result["choices"][0]
        stopped.append(choice.get("finish_reason") == "stop")
        answers.append((choice.get("message") or {}).get("content") or "")
    return tuple(stopped), tuple(answers)
