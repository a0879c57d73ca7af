"""The checks a GGUF file passes before it is published beside its merge.

(a) llama.cpp itself reads it back, when llama-cpp-python is installed (gguf_llama.py): it loads, tokenizes the
eval text exactly as the merge's tokenizer does, its perplexity over the same windows is within PPL_TOLERANCE of the
safetensors merge's, and the chat probe chats as the merge does: the GGUF's own chat template renders each prompt to
the merge's tokens, llama.cpp stops at the merge's end-of-turn token, its end-of-turn probability after each
reference answer is within EOT_TOLERANCE of the merge's, and free-running greedy it answers every prompt and ends
its turn on at least half as many as the merge (a quantized model's greedy path may wander on a close call; the
teacher-forced probability is the steady measure).

(b) An independent reader, transformers' GGUF loader, gives back every tensor of the merge: exactly for F16/BF16
(the merge's values rounded to the type; Gemma's stored norm + 1 back within float32 rounding), within one
quantization step of each 32-value block for Q8_0, and within K_QUANT_RMS relative RMS error for llama.cpp's
k-quants. It holds the whole model in float32 (the loader de-quantizes the file at once), as the gate holds the merge.

A file that fails gets passed=False and one line saying why.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from mergebot.config.gguf import llama_cpp_installed
from mergebot.gguf.convert import GgufFile
from mergebot.gguf.shards import list_tensors
from mergebot.pipeline.facts import read_facts
from mergebot.pipeline.gguf_llama import ChatIds, LlamaReadBack, read_back
from mergebot.pipeline.gguf_read import gguf_parsed_once, no_progress_bars
from mergebot.pipeline.perplexity import (
    DEFAULT_MAX_WINDOWS,
    DEFAULT_WINDOW,
    load_model,
    load_tokenizer,
    measure,
    one_line,
    token_ids,
)
from mergebot.pipeline.probe import DEFAULT_PROMPTS, ProbeResult, Prompt, probe_ids, read_prompts, run_probe

PPL_TOLERANCE = {"F16": 0.01, "BF16": 0.01, "Q8_0": 0.02, "Q6_K": 0.05, "Q5_K_M": 0.08, "Q5_K_S": 0.08}
"""The most the GGUF's perplexity (llama.cpp) may exceed the merge's (transformers, float32 compute), relative.
F16/BF16 hold the merge's own values and differ only in kernels' rounding; each quantized type adds its error."""
DEFAULT_PPL_TOLERANCE = 0.25
"""For the coarser k-quants (Q4_K and below), whose loss on a small model is large but bounded."""
K_QUANT_RMS = 0.25
"""A k-quant tensor's RMS error relative to its RMS: quantization noise is well under it, a wrong layout (rows
permuted, a tensor swapped) is about 1.4."""
EOT_TOLERANCE = 0.1
"""The most the GGUF's end-of-turn probability after a reference answer may differ from the merge's, averaged over
the probe's prompts (absolute)."""
EXACT = {"F16": torch.float16, "BF16": torch.bfloat16}
"""The types holding the merge's values rounded once, compared exactly."""


@dataclass(frozen=True)
class MergeFigures:
    """The safetensors merge measured as the gate measures it: perplexity on the eval text's windows, and the
    probe's result (None when it has no chat template or end-of-turn token)."""

    ppl: float
    probe: ProbeResult | None


@dataclass(frozen=True)
class GgufVerdict:
    passed: bool
    reason: str
    """One line: why it failed, or what was checked."""
    perplexity: float | None
    """llama.cpp's perplexity of the eval text, None where llama.cpp is not installed."""
    merge_perplexity: float
    tensors_checked: int
    worst_tensor: str
    """The tensor furthest from the merge, relative to its type's bound, and that ratio ("name 0.41")."""
    eot_prob: float | None
    """llama.cpp's mean end-of-turn probability after the probe's reference answers; `merge_eot_prob`: the merge's."""
    merge_eot_prob: float | None
    probe_stopped: int | None
    """Probe prompts the GGUF ended its turn on, free-running under llama.cpp; `merge_stopped`: the merge's."""
    merge_stopped: int | None
    read_by_llama_cpp: bool


def measure_merge(
    merged_dir: Path, eval_text: str, prompts: list[Prompt], window: int, max_windows: int
) -> MergeFigures:
    """The merge's figures when the caller has none from its gate (transformers, the same functions the gate uses)."""
    tokenizer = load_tokenizer(merged_dir)
    ids, _ = token_ids(tokenizer, eval_text)
    model = load_model(merged_dir)
    ppl = measure(model, ids, window, max_windows).signature.ppl
    return MergeFigures(ppl, run_probe(model, read_facts("merge", merged_dir), prompts))


def check_gguf(
    gguf: GgufFile,
    merged_dir: Path,
    eval_text: str,
    *,
    merge: MergeFigures | None = None,
    prompts: list[Prompt] | None = None,
    window: int = DEFAULT_WINDOW,
    max_windows: int = DEFAULT_MAX_WINDOWS,
) -> GgufVerdict:
    """Check `gguf`, converted from `merged_dir`, as the module says. `merge`: the gate's figures for the merge,
    measured with the same eval text, windows and prompts (measured here when not given)."""
    prompts = prompts if prompts is not None else read_prompts(DEFAULT_PROMPTS)
    if merge is None:
        merge = measure_merge(merged_dir, eval_text, prompts, window, max_windows)
    probe = merge.probe
    figures = {
        "perplexity": None,
        "merge_perplexity": merge.ppl,
        "eot_prob": None,
        "merge_eot_prob": probe.mean_eot_prob if probe is not None else None,
        "probe_stopped": None,
        "merge_stopped": sum(probe.stopped) if probe is not None else None,
        "read_by_llama_cpp": False,
    }
    problem, checked, worst = compare_tensors(gguf, merged_dir)
    figures |= {"tensors_checked": checked, "worst_tensor": worst}
    if problem is not None:
        return GgufVerdict(False, problem, **figures)
    if not llama_cpp_installed():
        return GgufVerdict(True, f"{checked} tensors match (worst {worst}); llama.cpp is not installed", **figures)
    facts = read_facts("merge", merged_dir)
    tokenizer = facts.tokenizer or load_tokenizer(merged_dir)
    chat = None
    if probe is not None and facts.turn_end_id is not None:
        chat = ChatIds(*probe_ids(tokenizer, prompts), facts.turn_end_id)
    ids, _ = token_ids(tokenizer, eval_text)
    text_ids = list(tokenizer(eval_text, add_special_tokens=False)["input_ids"])
    back = read_back(gguf.path, eval_text, text_ids, ids, window, max_windows, prompts, chat)
    figures |= {
        "perplexity": back.ppl,
        "eot_prob": sum(back.eot_probs) / len(back.eot_probs) if back.eot_probs else None,
        "probe_stopped": sum(back.stopped) if back.stopped else None,
        "read_by_llama_cpp": back.problem is None,
    }
    failure = _llama_problem(gguf.file_type, back, merge)
    if failure is not None:
        return GgufVerdict(False, failure, **figures)
    reason = (
        f"{checked} tensors match (worst {worst}); llama.cpp: same tokens, perplexity {back.ppl:.3f} vs {merge.ppl:.3f}"
    )
    if chat is not None:
        reason += (
            f", end of turn {figures['eot_prob']:.2f} vs {figures['merge_eot_prob']:.2f}, stopped "
            f"{figures['probe_stopped']}/{len(prompts)} vs {figures['merge_stopped']}"
        )
    return GgufVerdict(True, reason, **figures)


def ppl_tolerance(file_type: str) -> float:
    return PPL_TOLERANCE.get(file_type, DEFAULT_PPL_TOLERANCE)


def _llama_problem(file_type: str, back: LlamaReadBack, merge: MergeFigures) -> str | None:
    """The first of llama.cpp's findings that refuses the file, as one line."""
    if back.problem is not None:
        return back.problem
    if back.first_difference is not None:
        return f"llama.cpp tokenizes the eval text unlike the merge's tokenizer (from token {back.first_difference})"
    limit = merge.ppl * (1 + ppl_tolerance(file_type))
    if not math.isfinite(back.ppl) or back.ppl > limit:
        return (
            f"llama.cpp's perplexity {back.ppl:.3f} is over {limit:.3f}, the merge's {merge.ppl:.3f} "
            f"+{ppl_tolerance(file_type):.0%} allowed for {file_type}"
        )
    if merge.probe is None:
        return None
    if back.template_differs is not None:
        return f"the GGUF's chat template renders probe prompt {back.template_differs} unlike the merge's"
    if not back.turn_end_stops:
        return "llama.cpp does not stop at the merge's end-of-turn token"
    gap = sum(abs(a - b) for a, b in zip(back.eot_probs, merge.probe.eot_prob, strict=True)) / len(back.eot_probs)
    if gap > EOT_TOLERANCE:
        return f"llama.cpp's end-of-turn probability after the probe's answers differs from the merge's by {gap:.2f}"
    stops, merge_stops = sum(back.stopped), sum(merge.probe.stopped)
    if stops < math.ceil(merge_stops / 2) or not all(answer.strip() for answer in back.answers):
        return f"llama.cpp ends its turn on {stops} of {len(back.stopped)} probe prompts, the merge on {merge_stops}"
    return None


def compare_tensors(gguf: GgufFile, merged_dir: Path) -> tuple[str | None, int, str]:
    """transformers' GGUF loader's tensors against the merge's: (problem or None, tensors compared, worst). An
    architecture transformers cannot read (Gemma 1) is left to llama.cpp's read-back, and says so."""
    architecture = GGUFReader(gguf.path).fields["general.architecture"].contents()
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        return None, 0, f"none: transformers reads no {architecture} GGUF"
    try:  # float32: transformers de-quantizes the whole file into memory anyway
        with no_progress_bars(), gguf_parsed_once():
            directory, name = gguf.path.parent, gguf.path.name
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except Exception as failure:  # transformers raises many types for a file it cannot read; all mean "unreadable"
        return f"transformers cannot read the GGUF file ({one_line(failure)})", 0, "-"
    loaded = model.state_dict()
    sources = list_tensors(merged_dir)
    expected = {name for name in sources if not name.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in sources:
        loaded.pop("lm_head.weight", None)  # tied: transformers shows the embedding under both names
    missing, extra = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
    if missing or extra:
        return f"GGUF tensors differ from the merge's: missing {missing[:3]}, unexpected {extra[:3]}", 0, "-"
    worst, worst_name = 0.0, "-"
    with _Opened(sources) as merged:
        for name in sorted(expected):
            tensor = merged.get(name)
            if tensor.shape != loaded[name].shape:
                shapes = f"{tuple(loaded[name].shape)}, the merge's {tuple(tensor.shape)}"
                return f"transformers reads tensor {name} of the GGUF file as {shapes}", 0, "-"
            ratio = _error_ratio(gguf.file_type, tensor, loaded[name])
            if not ratio <= 1.0:
                return f"tensor {name} differs from the merge's beyond {gguf.file_type}'s error ({ratio:.3g}x)", 0, "-"
            if ratio > worst:
                worst, worst_name = ratio, name
    return None, len(expected), f"{worst_name} {worst:.2f}" if worst else "every tensor exact"


def _error_ratio(file_type: str, merged: torch.Tensor, loaded: torch.Tensor) -> float:
    """How far the loaded tensor is from the merge's, as a fraction of what the file's type allows (1.0 = the
    bound; 0 for an exact match, inf for any difference where the type must be exact)."""
    if merged.dim() < 2:  # float32 in the file: exact, or within float32 rounding of Gemma's w + 1 - 1
        allowed = 2**-22 * (1 + merged.float().abs())
        return float(((loaded - merged.float()).abs() / allowed).max()) if merged.numel() else 0.0
    exact = EXACT.get(file_type, torch.float16 if file_type == "Q8_0" and merged.shape[-1] % 32 else None)
    if exact is not None:  # (a Q8_0 file holds a matrix whose rows do not split into blocks as F16)
        return 0.0 if torch.equal(loaded, merged.to(exact).float()) else math.inf
    merged = merged.float()
    if file_type == "Q8_0":
        step = merged.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
        return float(((loaded - merged).reshape(-1, 32).abs() / (step * 1.01 + 1e-30)).max())
    rms = float(merged.pow(2).mean().sqrt())
    return float((loaded - merged).pow(2).mean().sqrt()) / (K_QUANT_RMS * rms) if rms else 0.0


class _Opened:
    """The merge's shards opened once each with safetensors (memory-mapped), a tensor read at a time."""

    def __init__(self, sources: dict) -> None:
        self._files = {name: tensor.file for name, tensor in sources.items()}
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(name)

    def __enter__(self) -> "_Opened":
        return self

    def __exit__(self, *_exc: object) -> None:
        self._open.clear()
