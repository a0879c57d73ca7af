"""The output of a mixture of experts as mergekit-moe 0.1.5 writes it: which architecture, each output tensor as the
input tensors it is made of (copied, or stacked in order), the router tensors, and the shards they go in.

Decided from names, shapes, dtypes and config.json only, never from values, so an expert's update keeps every tensor
in its shard. Shards never mix groups: the base's tensors, each expert's (for Qwen and DeepSeek, whose experts are
tensors of their own), the routers; so an update of one expert rewrites only the shards holding it.
"""

from dataclasses import dataclass

from mergebot.config.moe import ARCHITECTURE_NAMES, Expert, MoeConfig
from mergebot.errors import ConfigError, ModelError
from mergebot.merge.io import BY_TORCH_NAME, DType, OutputTensor, TensorInfo
from mergebot.merge.source import InputModel

MIXTRAL, DEEPSEEK, QWEN, QWEN3 = ARCHITECTURE_NAMES
INPUT_TYPES = {MIXTRAL: ("llama", "mistral"), DEEPSEEK: ("llama", "mistral"), QWEN: ("llama", "mistral", "qwen2")}
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Piece:
    """One input tensor, as part of an output tensor; `expert`: its index among the config's experts then shared
    experts, for its noise and residual scale (None: a base tensor, copied as it is)."""

    model: str
    tensor: str
    expert: int | None = None
    residual: bool = False
    """A down_proj: the expert's residual_scale applies."""


@dataclass(frozen=True)
class MoeTensor:
    """An output tensor: its pieces' values one after another (a copy, or experts stacked); no pieces and no router:
    zeros (Qwen's attention biases for a base without them)."""

    output: OutputTensor
    pieces: tuple[Piece, ...] = ()
    router: tuple[int, int, int] | None = None
    """(layer, first row, rows) of the router weights computed for the layer."""


@dataclass(frozen=True)
class MoeShard:
    file_name: str
    tensors: tuple[MoeTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.output.nbytes for t in self.tensors)


@dataclass(frozen=True)
class MoeLayout:
    architecture: str
    shards: tuple[MoeShard, ...]
    layers: int
    hidden: int
    dtype: DType | None
    """The output dtype (None: each tensor keeps its input's)."""


def choose_architecture(config: MoeConfig, models: dict[str, InputModel]) -> str:
    """mergekit-moe's choice: among the architectures `architecture` names (all when unset), those that can hold
    these models; Mixtral when it can, else the first."""
    named = [n for n in ARCHITECTURE_NAMES if n.lower().startswith(config.architecture or "")]
    reasons = {name: _unsupported(name, config, models) for name in named}
    fitting = [name for name, reason in reasons.items() if reason is None]
    if not fitting:
        why = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
        raise ConfigError(f"{config.source}: architecture: no output architecture holds these models ({why})")
    return fitting[0]


def _unsupported(name: str, config: MoeConfig, models: dict[str, InputModel]) -> str | None:
    """Why the architecture cannot hold the config's models, as mergekit-moe 0.1.5 decides; None when it can."""
    shared = config.shared_experts
    if name == QWEN3:
        return "mergebot does not write Qwen3 MoE (its inputs must be Qwen3 models)"
    if name == MIXTRAL and shared:
        return "no shared experts"
    if name == DEEPSEEK and len(shared) > 1:
        return "at most one shared expert"
    if name == DEEPSEEK and shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "its shared expert takes no prompts"
    if name == QWEN and len(shared) != 1:
        return "exactly one shared expert"
    if name == QWEN and config.gate_mode != "random" and not shared[0].positive_prompts:
        return "its shared expert needs prompts"
    types = {str(model.config.get("model_type")) for model in models.values()}
    if len(types) != 1:
        return f"the models are of different types ({', '.join(sorted(types))})"
    if types.pop() not in INPUT_TYPES[name]:
        return f"its inputs are {', '.join(INPUT_TYPES[name])} models"
    return None


def _size(model: InputModel, name: str) -> int:
    """A size config.json must give as a positive whole number."""
    value = model.config.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelError(f"model {model.label}: config.json: {name} is {value!r}, not a positive whole number")
    return value


def output_dtype(config: MoeConfig, base: InputModel) -> DType | None:
    """`dtype`, else the base's torch_dtype, as mergekit-moe picks it."""
    name = config.dtype or base.config.get("torch_dtype") or base.config.get("dtype")
    if not name:
        return None
    dtype = BY_TORCH_NAME.get(str(name).removeprefix("torch."))
    if dtype is None or not dtype.floating:
        raise ModelError(f"model {base.label}: config.json: torch_dtype {name!r} is not a floating point dtype")
    return dtype


def plan_moe(config: MoeConfig, models: dict[str, InputModel]) -> MoeLayout:
    """Every output tensor, grouped and packed into shards; raises before any tensor is read."""
    architecture = choose_architecture(config, models)
    base = models[config.base_model]
    layers, hidden = (_size(base, name) for name in ("num_hidden_layers", "hidden_size"))
    _size(base, "intermediate_size")  # the experts' size in config.json
    dtype = output_dtype(config, base)
    builder = _Builder(config, models, dtype)
    groups = [builder.base_tensors(architecture, layers)]
    if architecture == MIXTRAL:
        groups.append([t for layer in range(layers) for t in builder.stacked(layer)])
    else:
        for index, _ in enumerate(config.experts):
            groups.append([t for layer in range(layers) for t in builder.expert(layer, index, f"experts.{index}.")])
        shared_name = "shared_expert." if architecture == QWEN else "shared_experts."
        for index, _ in enumerate(config.shared_experts):
            at = len(config.experts) + index
            groups.append([t for layer in range(layers) for t in builder.expert(layer, at, shared_name)])
    groups.append(builder.routers(architecture, layers, hidden))
    return MoeLayout(architecture, _pack(groups, config.out_shard_size), layers, hidden, dtype)


class _Builder:
    def __init__(self, config: MoeConfig, models: dict[str, InputModel], dtype: DType | None):
        self.config = config
        self.models = models
        self.dtype = dtype
        self.everyone: tuple[Expert, ...] = config.experts + config.shared_experts

    def _info(self, model: str, name: str) -> TensorInfo:
        info = self.models[model].tensors.get(name)
        if info is None:
            raise ModelError(f"model {model} lacks tensor {name}")
        if not info.dtype.floating:
            raise ModelError(f"tensor {name} in model {model} is not floating point")
        return info

    def _mlp_info(self, model: str, name: str) -> TensorInfo:
        """An expert's MLP weight, of the base's shape (the output's config.json is the base's)."""
        info = self._info(model, name)
        expected = self._info(self.config.base_model, name).shape
        if info.shape != expected:
            raise ModelError(
                f"tensor {name}: shape {list(info.shape)} in model {model} does not match {list(expected)} in the "
                f"base model {self.config.base_model}"
            )
        return info

    def _output(self, name: str, shape: tuple[int, ...], input_dtype: DType) -> OutputTensor:
        return OutputTensor(name, self.dtype or input_dtype, shape)

    def base_tensors(self, architecture: str, layers: int) -> list[MoeTensor]:
        """Everything but the MLPs, from the base; Qwen's attention biases as zeros when the base has none."""
        base = self.models[self.config.base_model]
        kept = [name for name in base.tensors if ".mlp." not in name]
        known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        for layer in range(layers):
            prefix = f"model.layers.{layer}."
            known |= {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
            known |= {f"{prefix}self_attn.{p}.weight" for p in ATTENTION}
            if architecture == QWEN:
                known |= {f"{prefix}self_attn.{p}.bias" for p in ATTENTION[:3]}
        extra = sorted(set(kept) - known)
        if extra:
            raise ModelError(f"model {self.config.base_model} has tensor {extra[0]}, which mergekit-moe leaves out")
        tensors = []
        for name in _natural(known):
            if name in base.tensors:
                info = self._info(self.config.base_model, name)
                tensors.append(
                    MoeTensor(self._output(name, info.shape, info.dtype), (Piece(self.config.base_model, name),))
                )
            elif name.endswith("_proj.bias"):
                rows = self._info(self.config.base_model, name.removesuffix("bias") + "weight").shape[0]
                tensors.append(MoeTensor(self._output(name, (rows,), BY_TORCH_NAME["float32"])))
            elif name != "lm_head.weight":
                raise ModelError(f"model {self.config.base_model} lacks tensor {name}")
        return tensors

    def expert(self, layer: int, index: int, infix: str) -> list[MoeTensor]:
        """One expert's MLP of one layer, under its own names."""
        model = self.everyone[index].model
        tensors = []
        for projection in MLP:
            name = f"model.layers.{layer}.mlp.{projection}.weight"
            info = self._mlp_info(model, name)
            output = name.replace(".mlp.", f".mlp.{infix}")
            piece = Piece(model, name, index, projection == "down_proj")
            tensors.append(MoeTensor(self._output(output, info.shape, info.dtype), (piece,)))
        return tensors

    def stacked(self, layer: int) -> list[MoeTensor]:
        """Mixtral's fused experts of one layer, as transformers 5 holds them: gate_up_proj (experts, 2 ×
        intermediate, hidden), each expert's gate_proj rows then its up_proj rows; down_proj (experts, hidden,
        intermediate)."""
        prefix = f"model.layers.{layer}.mlp."
        fused = []
        for output, projections in (("experts.gate_up_proj", MLP[:2]), ("experts.down_proj", MLP[2:])):
            pieces = [
                Piece(expert.model, f"{prefix}{p}.weight", index, p == "down_proj")
                for index, expert in enumerate(self.config.experts)
                for p in projections
            ]
            infos = [self._mlp_info(piece.model, piece.tensor) for piece in pieces]
            rows, columns = infos[0].shape
            shape = (len(self.config.experts), rows * len(projections), columns)
            fused.append(MoeTensor(self._output(prefix + output, shape, infos[0].dtype), tuple(pieces)))
        return fused

    def routers(self, architecture: str, layers: int, hidden: int) -> list[MoeTensor]:
        """Each layer's router (experts × hidden) and Qwen's shared expert gate (1 × hidden), float32 when no output
        dtype is known (as the router is computed)."""
        count = len(self.config.experts)
        tensors = []
        for layer in range(layers):
            prefix = f"model.layers.{layer}.mlp."
            gate = self._output(prefix + "gate.weight", (count, hidden), BY_TORCH_NAME["float32"])
            tensors.append(MoeTensor(gate, router=(layer, 0, count)))
            if architecture == QWEN:
                shared = self._output(prefix + "shared_expert_gate.weight", (1, hidden), BY_TORCH_NAME["float32"])
                tensors.append(MoeTensor(shared, router=(layer, count, 1)))
        return tensors


def _natural(names: set[str]) -> list[str]:
    """Embeddings first, then layer by layer, then the final norm and head."""

    def order(name: str) -> tuple[int, int, str]:
        parts = name.split(".")
        if name.startswith("model.embed"):
            return (0, 0, name)
        if parts[1] == "layers":
            return (1, int(parts[2]), name)
        return (2, 0, name)

    return sorted(names, key=order)


def _pack(groups: list[list[MoeTensor]], shard_size: int) -> tuple[MoeShard, ...]:
    """Greedy within each group, in order; a group always starts a shard."""
    packed: list[list[MoeTensor]] = []
    for group in groups:
        size, fresh = 0, True
        for tensor in group:
            if fresh or size + tensor.output.nbytes > shard_size:
                fresh = False
                packed.append([])
                size = 0
            packed[-1].append(tensor)
            size += tensor.output.nbytes
    total = len(packed)
    return tuple(
        MoeShard(f"model-{number:05d}-of-{total:05d}.safetensors", tuple(tensors))
        for number, tensors in enumerate(packed, 1)
    )
