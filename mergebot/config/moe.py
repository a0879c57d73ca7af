"""mergekit-moe configs → a typed, checked `MoeConfig`, as mergekit 0.1.5's `mergekit-moe` reads them: `base_model`,
`experts` (`source_model`, `positive_prompts`, `negative_prompts`, `noise_scale`, `residual_scale`),
`experts_per_token`, `gate_mode`, `architecture`, `shared_experts`, `dtype`; and mergebot's `out_shard_size`.

A document is a mergekit-moe config when it has `experts` (a merge config never does). Every problem is reported at
once with `file:line: key`; keys mergekit-moe ignores (it has no tokenizer or chat-template keys: the output takes
the base's tokenizer) are ignored with one warning each, and what mergebot cannot reproduce is refused.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebot.config.document import Findings, Located, did_you_mean, parse_size, read_document
from mergebot.config.models import ModelSpec, Names, parse_reference
from mergebot.errors import ConfigError

MOE_KEYS = {
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
    "out_shard_size",
}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
"""What mergekit-moe 0.1.5 computes a router from (`hidden` takes the last token's hidden state, `hidden_avg` the
mean over the prompt; `random` normal, `uniform_random` as torch initialises a Linear)."""
RANDOM_MODES = ("random", "uniform_random")
ARCHITECTURE_NAMES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
"""mergekit-moe's output architectures in the order it prefers them; `architecture` picks those whose name starts
with it (case aside)."""
DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Expert:
    """One dense model whose MLP becomes an expert (or a shared expert) of every layer."""

    model: str
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    """Gaussian noise of this standard deviation added to each of its MLP weights (seeded here; see the README)."""
    residual_scale: float | None = None
    """Its down_proj (the MLP's output) multiplied by this."""

    def as_dict(self, spec: ModelSpec) -> dict[str, Any]:
        result: dict[str, Any] = {"source_model": spec.reference()}
        if self.positive_prompts:
            result["positive_prompts"] = list(self.positive_prompts)
        if self.negative_prompts:
            result["negative_prompts"] = list(self.negative_prompts)
        for name in ("noise_scale", "residual_scale"):
            if getattr(self, name) is not None:
                result[name] = getattr(self, name)
        return result


@dataclass(frozen=True)
class MoeConfig:
    """A mixture of experts built from dense models; `models` lists every distinct input (the base first)."""

    base_model: str
    experts: tuple[Expert, ...]
    models: tuple[ModelSpec, ...]
    gate_mode: str = "hidden"
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None
    """As written, lower case; None: mergekit's choice from the models (`mergebot.merge.moe_layout`)."""
    dtype: str | None = None
    """The output's dtype; None: the base's."""
    out_shard_size: int = 5 * 1000**3
    source: str = "<config>"
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def tokenizer_source(self) -> str:
        """mergekit-moe saves the base's tokenizer."""
        return self.base_model

    @property
    def gated(self) -> tuple[Expert, ...]:
        """The experts a router row is computed for, in row order: the experts, then the shared experts when they
        have prompts or the router is random (as mergekit-moe decides)."""
        shared = self.shared_experts
        if shared and (any(e.positive_prompts for e in shared) or self.gate_mode in RANDOM_MODES):
            return self.experts + shared
        return self.experts

    @property
    def sources(self) -> set[str]:
        return {checkpoint.name for spec in self.models for checkpoint in spec.checkpoints}

    def spec(self, model: str) -> ModelSpec:
        return next(spec for spec in self.models if spec.model == model)

    def pinned(self, revisions: Mapping[str, tuple[str | None, str | None]]) -> "MoeConfig":
        """The same MoE with each model's revision fixed to the sha read (model → (revision, adapter's))."""
        models = tuple(replace(s, revision=revisions.get(s.model, (None,))[0] or s.revision) for s in self.models)
        return replace(self, models=models)

    def as_dict(self) -> dict[str, Any]:
        """The config in mergekit-moe's field names (revisions inline), for the output and the model card."""
        result: dict[str, Any] = {
            "base_model": self.spec(self.base_model).reference(),
            "gate_mode": self.gate_mode,
            "experts_per_token": self.experts_per_token,
            "experts": [e.as_dict(self.spec(e.model)) for e in self.experts],
        }
        if self.shared_experts:
            result["shared_experts"] = [e.as_dict(self.spec(e.model)) for e in self.shared_experts]
        if self.architecture:
            result["architecture"] = self.architecture
        if self.dtype:
            result["dtype"] = self.dtype
        result["out_shard_size"] = self.out_shard_size
        return result


def is_moe_document(document: Mapping[str, Any]) -> bool:
    """A mergekit-moe config rather than a mergekit-yaml one: it lists `experts`."""
    return "experts" in document


def parse_moe(raw: Mapping[str, Any], located: Located, prefix: str = "", names: Names | None = None) -> MoeConfig:
    """Check and type a mergekit-moe config; raises every problem at once (ConfigErrors)."""
    findings = Findings(located)

    def key(name: str) -> str:
        return f"{prefix}{name}"

    if "merge_method" in raw:
        findings.add(
            located.error(
                key("merge_method"), "a mergekit-yaml key, and this is a mergekit-moe config (it has experts)"
            )
        )
    for name in sorted(set(raw) - MOE_KEYS - {"merge_method"}, key=str):
        findings.ignored(key(name), f"mergekit-moe has no such key{did_you_mean(str(name), MOE_KEYS)}")
    specs: dict[str, ModelSpec] = {}

    def model(value: Any, where: str) -> str | None:
        spec = findings.attempt(parse_reference, value, located, where, names)
        if spec is None:
            if value is None:
                findings.add(located.error(where, "required: a model path or repo id"))
            return None
        if spec.lora is not None:
            findings.add(
                located.error(where, "mergekit-moe 0.1.5 cannot read a model+LoRA input (it stops at it)", value)
            )
            return None
        known = specs.get(spec.model)
        if known is not None and known.revision != spec.revision:
            findings.add(located.error(where, f"{spec.model} is named at two revisions", value))
        specs.setdefault(spec.model, spec)
        return spec.model

    base = model(raw.get("base_model"), key("base_model"))
    gate_mode = raw.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        findings.add(
            located.error(
                key("gate_mode"),
                f"{gate_mode!r} is not a gate mode{did_you_mean(str(gate_mode), GATE_MODES)} "
                f"(known: {', '.join(GATE_MODES)})",
            )
        )
    experts = _experts(raw.get("experts"), key("experts"), findings, model, required=True)
    shared = _experts(raw.get("shared_experts"), key("shared_experts"), findings, model, required=False)
    per_token = raw.get("experts_per_token", 2)
    if not isinstance(per_token, int) or isinstance(per_token, bool) or per_token < 1:
        findings.add(located.error(key("experts_per_token"), f"{per_token!r} is not a whole number of at least 1"))
    elif experts and len(experts) < per_token:
        findings.add(
            located.error(key("experts_per_token"), f"{per_token} experts per token, but only {len(experts)} experts")
        )
    architecture = _architecture(raw.get("architecture"), key("architecture"), findings)
    dtype = raw.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            findings.add(located.error(key("dtype"), f"{raw['dtype']!r} is not one of {', '.join(DTYPES)}"))
    shard_size = 5 * 1000**3
    if "out_shard_size" in raw:
        shard_size = findings.attempt(parse_size, raw["out_shard_size"], key("out_shard_size"), located) or shard_size
    if experts and gate_mode in GATE_MODES:
        _check_prompts(experts, shared, gate_mode, key, findings)
    findings.raise_problems()
    assert base is not None
    return MoeConfig(
        base_model=base,
        experts=tuple(experts),
        models=tuple(specs.values()),
        gate_mode=gate_mode,
        experts_per_token=per_token,
        shared_experts=tuple(shared),
        architecture=architecture,
        dtype=dtype,
        out_shard_size=shard_size,
        source=str(located.path),
        warnings=tuple(dict.fromkeys(findings.warnings)),
    )


def _experts(value: Any, where: str, findings: Findings, model: Any, required: bool) -> list[Expert]:
    located = findings.located
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        findings.add(located.error(where, "must be a list of experts, each with a source_model"))
        return []
    experts = []
    for index, entry in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(entry, Mapping):
            findings.add(located.error(at, "must be a table with source_model"))
            continue
        for name in sorted(set(entry) - EXPERT_KEYS, key=str):
            findings.ignored(f"{at}.{name}", f"mergekit-moe has no such key{did_you_mean(str(name), EXPERT_KEYS)}")
        name = model(entry.get("source_model"), f"{at}.source_model")
        positive, negative = (
            _prompts(entry.get(k), f"{at}.{k}", findings) for k in ("positive_prompts", "negative_prompts")
        )
        scales = {k: _number(entry.get(k), f"{at}.{k}", findings) for k in ("noise_scale", "residual_scale")}
        if name is not None:
            experts.append(Expert(name, positive, negative, **scales))
    return experts


def _prompts(value: Any, where: str, findings: Findings) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        findings.add(findings.located.error(where, "must be a list of prompt strings"))
        return ()
    return tuple(value)


def _number(value: Any, where: str, findings: Findings) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        findings.add(findings.located.error(where, f"{value!r} is not a finite number"))
        return None
    return float(value)


def _architecture(value: Any, where: str, findings: Findings) -> str | None:
    """The written `architecture`, lower case, when some output architecture's name starts with it."""
    if value is None:
        return None
    written = str(value).lower()
    if not any(name.lower().startswith(written) for name in ARCHITECTURE_NAMES):
        findings.add(
            findings.located.error(
                where, f"{value!r} names no output architecture (mergekit-moe's: {', '.join(ARCHITECTURE_NAMES)})"
            )
        )
    return written


def _check_prompts(experts: list[Expert], shared: list[Expert], gate_mode: str, key: Any, findings: Findings) -> None:
    """mergekit-moe's refusals, in its order: a router from prompts (any mode but `random`) needs each expert's
    positive prompts, not the same for every expert, and experts that are not all one model (mergebot has no flag
    to insist); shared experts have prompts all or none."""
    located = findings.located
    if gate_mode != "random":
        for index, expert in enumerate(experts):
            if not expert.positive_prompts:
                at = f"{key('experts')}[{index}].positive_prompts"
                findings.add(located.error(at, f"required for gate_mode {gate_mode}", at=f"{key('experts')}"))
        if all(e.positive_prompts for e in experts):
            if len({(e.positive_prompts, e.negative_prompts) for e in experts}) == 1:
                why = "only one expert" if len(experts) == 1 else "every expert has the same prompts"
                findings.add(located.error(key("experts"), f"{why}, so the router cannot tell experts apart"))
            elif len({e.model for e in experts}) == 1:
                findings.add(
                    located.error(key("experts"), "every expert is the same model: the mixture computes what it does")
                )
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        findings.add(located.error(key("shared_experts"), "give prompts for every shared expert or for none"))


def load_moe_config(path: Path, names: Names | None = None) -> MoeConfig:
    """A mergekit-moe YAML (or TOML) file."""
    document, located = read_document(path)
    if not is_moe_document(document):
        raise ConfigError(f"{path}: not a mergekit-moe config (it has no experts)")
    return parse_moe(document, located, names=names)
