"""Small Llama-shaped Hugging Face checkpoints made in code, for tests, the demo and benchmarks.

Nothing is ever downloaded: config, tokenizer and weights are all generated here, deterministically (same arguments,
byte-identical files), so tests can build parents and "fine-tunes" of them in milliseconds and benchmarks can build
gigabyte-sized models without holding more than one shard in memory.
"""

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

DEFAULT_VOCAB = 512
INIT_STD = 0.02
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# The base vocabulary: punctuation, digits and plain English words that cover config/eval.txt, so perplexity on the
# project's eval text is measured on real token ids rather than on a stream of <unk>. Order is fixed forever:
# token ids of every synthetic model depend on it.
_PUNCTUATION = (".", ",", ";", ":", "!", "?", "'", '"', "(", ")", "-", "/")
_WORD_TEXT = """
a about above after afternoon afternoons again against air all almost along also always an and another any
anyone apart apple april are arrive as at autumn away back bags be beans because bed beds been before behind
below bends best between birds both bring broad brown bunches but by can careful changes clear cloth cloud
clouds cold come comes cool could cover covered crumbles dark day days decides did do does down drink dry each
early earth easily east end even evening every everything fall falls far feathers few field fine fingers first
flower flowers follow for forward fresh from frost fruit full garden gardener gate gently go good green grey
ground grow grows had hail handful hang has have he heavy hedge her here high him his hold holds hot how if in
into is it its just keep keeps kind late later layer leave leaves less let lettuce light like little long look
looks low made make many march marked may mind more morning most much must near need neighbours never new next
night nights no north not nothing now of off often old on once one only open or other our out over paper path
paths peas picks place plant plants pull quickly rain rains read red rest rests return ripe root roots row
rows said same season see seed seeds shade shares she short shorter should showers side sky slowly small
smells snow so soft soil some soon south sow spinach spring sticks still stone storm story string such sudden
summer sun sunny take takes tall tell temperature than that the their them then there these they thin thing
things this those through thunder time to together tomatoes too tree trees turn two under until up upon us
very vine wait waits wakes walk walks warm was wash watch water watered way we weather weeds week weeks well
were west wet what when where whether which while white who whole why will wind winter with without wood
wooden work would year years yellow yet you young
"""
_WORDS = tuple(_WORD_TEXT.split())


def base_vocabulary(vocab: int = DEFAULT_VOCAB) -> list[str]:
    """Token strings for ids 0..vocab-1: specials, punctuation, digits, words, then filler `tok<N>`.

    A smaller vocabulary is always a prefix of a larger one, so ids agree between models of different sizes.
    """
    if vocab < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab}")
    tokens = [*SPECIAL_TOKENS, *_PUNCTUATION, *(str(d) for d in range(10)), *_WORDS]
    tokens.extend(f"tok{i}" for i in range(len(tokens), vocab))
    return tokens[:vocab]


def build_tokenizer(tokens: Sequence[str], extra_tokens: Sequence[str] = ()) -> Tokenizer:
    """A lower-casing word-level tokenizer over `tokens` (ids in order), plus `extra_tokens` as added tokens.

    Like Llama's, it prepends <s> when asked to add special tokens; decoding joins words with spaces.
    """
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=SPECIAL_TOKENS[UNK_ID]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos = SPECIAL_TOKENS[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    _add_extra_tokens(tok, extra_tokens)
    return tok


def _add_extra_tokens(tok: Tokenizer, extra_tokens: Sequence[str]) -> int:
    """Append the tokens not yet known; returns how many were new (each gets the next id)."""
    known = tok.get_vocab(with_added_tokens=True)
    new = [t for t in dict.fromkeys(extra_tokens) if t not in known]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
    return len(new)


def llama_config(
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    dtype: torch.dtype,
    tie_embeddings: bool,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
) -> dict:
    """config.json content that `LlamaForCausalLM.from_pretrained` accepts under transformers 4.x and 5.x.

    Both spellings of the dtype key and of the RoPE base are written, as each major version reads a different one.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "rope_theta": rope_theta,
        "tie_word_embeddings": tie_embeddings,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": vocab,
    }


def llama_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM's state dict for `config`, in the order transformers uses."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_model(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = DEFAULT_VOCAB,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    tie_embeddings: bool = False,
    shard_size: int | None = None,
    base: Path | None = None,
    noise: float = 0.02,
    extra_tokens: Sequence[str] = (),
) -> Path:
    """Write a complete Llama checkpoint directory at `path` (which must be absent or empty) and return it.

    Without `base`: random init, normal(0, INIT_STD) matrices and norms of 1, so logits stay small and perplexity
    is finite and close to the vocabulary size. With `base`: a "fine-tune" — the base's architecture, tokenizer and
    tensor names (the shape, vocab and tie arguments are ignored), each tensor plus seeded noise of `noise` × its
    RMS; `extra_tokens` add tokenizer entries and randomly initialised embed_tokens/lm_head rows. `dtype` defaults
    to bfloat16, or the base's dtype. `shard_size` (bytes) splits weights into `model-0000K-of-0000N.safetensors`
    with an index; None writes a single `model.safetensors`. Tensor values depend only on seed and name, never on
    sharding.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: not empty; synthetic models are written into a fresh directory")
    if base is None:
        tokenizer = build_tokenizer(base_vocabulary(vocab), extra_tokens)
        dtype = torch.bfloat16 if dtype is None else dtype
        config = llama_config(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            intermediate=intermediate,
            vocab=tokenizer.get_vocab_size(with_added_tokens=True),
            dtype=dtype,
            tie_embeddings=tie_embeddings,
        )
        shapes = llama_tensor_shapes(config)

        def tensor_for(name: str) -> torch.Tensor:
            return _init_tensor(name, shapes[name], dtype, seed)

    else:
        base = Path(base)
        config = json.loads((base / "config.json").read_text())
        tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        base_shapes = llama_tensor_shapes(config)
        if dtype is None:
            dtype = getattr(torch, config.get("dtype") or config["torch_dtype"])
        config["vocab_size"] += _add_extra_tokens(tokenizer, extra_tokens)
        config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
        shapes = llama_tensor_shapes(config)
        reader = _TensorReader(base)

        def tensor_for(name: str) -> torch.Tensor:
            base_tensor = reader.get(name)
            if tuple(base_tensor.shape) != base_shapes[name]:
                raise ValueError(
                    f"{base}: tensor {name} has shape {tuple(base_tensor.shape)}, config.json implies "
                    f"{base_shapes[name]}"
                )
            return _perturb_tensor(name, base_tensor, shapes[name], dtype, seed, noise)

    path.mkdir(parents=True, exist_ok=True)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    _write_tokenizer(path, tokenizer, config.get("max_position_embeddings", 2048))
    _write_weights(path, shapes, dtype, shard_size, tensor_for)
    return path


def _write_weights(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    shard_size: int | None,
    tensor_for: Callable[[str], torch.Tensor],
) -> None:
    """Make and save one shard at a time, so memory holds at most one shard plus one tensor's scratch."""
    weight_map: dict[str, str] = {}
    for file_name, names in _plan_shards(shapes, dtype, shard_size):
        tensors = {name: tensor_for(name) for name in names}
        save_file(tensors, str(path / file_name), metadata={"format": "pt"})
        del tensors  # before the next shard is built, not after: one shard in memory, never two
        weight_map.update(dict.fromkeys(names, file_name))
    if shard_size is not None:
        total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
        _write_json(
            path / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        )


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(path: Path, tokenizer: Tokenizer, max_length: int) -> None:
    """tokenizer.json plus the two small files AutoTokenizer reads to pick the fast tokenizer and its specials."""
    (path / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n")
    unk, bos, eos = SPECIAL_TOKENS
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    _write_json(path / "special_tokens_map.json", specials)
    _write_json(
        path / "tokenizer_config.json",
        {
            **specials,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_length,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )


def _plan_shards(
    shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, shard_size: int | None
) -> list[tuple[str, list[str]]]:
    """Greedy in-order packing (as transformers does): a tensor larger than `shard_size` gets a shard alone."""
    if shard_size is None:
        return [("model.safetensors", list(shapes))]
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * dtype.itemsize
        if groups[-1] and used + size > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class _TensorReader:
    """Reads a base checkpoint one tensor at a time.

    Each read maps the file only for that tensor: a mapping kept open would let every page already read count
    towards resident memory, growing with the model instead of staying at one tensor.
    """

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        self._model_dir = model_dir
        self._files = {name: model_dir / file for name, file in weight_map.items()}

    def get(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"{self._model_dir}: base checkpoint has no tensor {name}")
        with safe_open(str(self._files[name]), framework="pt") as f:
            return f.get_tensor(name)


_BLOCK_ELEMENTS = 1 << 20  # float32 scratch per step: 4 MiB, whatever the tensor size


def _generator(seed: int, *parts: str) -> torch.Generator:
    """A generator seeded from (seed, parts) through sha256, so every tensor has its own independent stream."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _row_blocks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _fill_random(out: torch.Tensor, gen: torch.Generator, std: float) -> None:
    """Fill a 2-D view with normal(0, std) in row blocks (block layout depends on shape only: deterministic)."""
    rows, cols = out.shape
    for r0, r1 in _row_blocks(rows, cols):
        out[r0:r1] = torch.randn((r1 - r0, cols), generator=gen).mul_(std)


def _init_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    if len(shape) == 1:  # RMSNorm weights start at 1, as in transformers' init
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    _fill_random(out, _generator(seed, "init", name), INIT_STD)
    return out


def _perturb_tensor(
    name: str,
    base: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    noise: float,
) -> torch.Tensor:
    """base + noise × rms(base) × normal(0, 1), in float32 row blocks; rows beyond the base (new tokens) are
    initialised like a fresh model's."""
    src = base.reshape(base.shape[0], -1)
    rows, cols = src.shape
    sum_sq = 0.0
    for r0, r1 in _row_blocks(rows, cols):
        block = src[r0:r1].double().view(-1)
        sum_sq += float(torch.dot(block, block))
    # Rounded so that a different summation order (thread count) cannot change a single output bit.
    scale = float(f"{noise * (sum_sq / max(src.numel(), 1)) ** 0.5:.6g}")
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1)
    gen = _generator(seed, "noise", name)
    for r0, r1 in _row_blocks(rows, cols):
        flat[r0:r1] = torch.randn((r1 - r0, cols), generator=gen).mul_(scale).add_(src[r0:r1])
    if shape[0] > rows:
        _fill_random(flat[rows:], _generator(seed, "new-rows", name), INIT_STD)
    return out
