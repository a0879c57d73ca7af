"""A GGUF file read back by llama.cpp itself (llama-cpp-python): does it load, tokenize the eval text as the merge's
tokenizer does, predict the eval text as well as the merge (perplexity over the same windows of the same ids), and
answer the probe's chat prompts with the chat template in its metadata, greedy, ending its turn?"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mergebot.pipeline.perplexity import windows
from mergebot.pipeline.probe import MAX_NEW_TOKENS, Prompt


@dataclass(frozen=True)
class LlamaReadBack:
    """What llama.cpp made of the file; `problem` is one line when it could not be measured at all."""

    problem: str | None = None
    tokens_agree: bool = False
    first_difference: int | None = None
    ppl: float = math.nan
    stopped: tuple[bool, ...] = ()
    answers: tuple[str, ...] = ()


def read_back(
    path: Path, text_ids: list[int], ids: list[int], window: int, max_windows: int, text: str, prompts: list[Prompt]
) -> LlamaReadBack:
    """Load `path` in llama.cpp (CPU, quiet), compare its tokenization of `text` with `text_ids` (the merge's,
    without special tokens), measure perplexity over `windows(ids, ...)`, and run `prompts` through its chat
    template."""
    import llama_cpp

    try:
        model = llama_cpp.Llama(
            str(path),
            n_ctx=max(window, 512),
            n_batch=window,
            logits_all=True,
            n_threads=max(1, min(4, os.cpu_count() or 1)),
            seed=0,
            verbose=False,
        )
    except (ValueError, RuntimeError) as failure:
        return LlamaReadBack(problem=f"llama.cpp cannot load it ({str(failure).splitlines()[0][:200]})")
    try:
        own = model.tokenize(text.encode(), add_bos=False, special=False)
        difference = next((i for i, (a, b) in enumerate(zip(own, text_ids, strict=False)) if a != b), None)
        if difference is None and len(own) != len(text_ids):
            difference = min(len(own), len(text_ids))
        ppl = _perplexity(model, windows(ids, window, max_windows))
        stopped, answers = _probe(model, prompts)
    finally:
        model.close()
    return LlamaReadBack(None, difference is None, difference, ppl, stopped, answers)


def _perplexity(model: object, chunks: list[list[int]]) -> float:
    """exp of the mean next-token NLL, each window evaluated from an empty context, log-softmax in float64."""
    nll, count = 0.0, 0
    for chunk in chunks:
        model.reset()
        model.eval(chunk)
        logits = np.asarray(model.scores[: len(chunk) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return math.exp(nll / count) if count else math.nan


def _probe(model: object, prompts: list[Prompt]) -> tuple[tuple[bool, ...], tuple[str, ...]]:
    """Each prompt as one user turn, rendered by llama-cpp-python with the GGUF's chat template, greedy, up to the
    probe's bound of new tokens: did it stop by itself (an end-of-generation token), and what it said."""
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
