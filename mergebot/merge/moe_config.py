"""The config.json of a mixture of experts, as mergekit-moe 0.1.5 derives it from the base's: the base's fields with
the output architecture's set (expert counts, routing, no sliding window).

mergekit builds Mixtral's and Qwen MoE's through transformers' config classes, which also write every field that
differs from the class's defaults; here the fields are set by hand (the merge layer does not import transformers),
and the test compares the two configs as transformers loads them.
"""

from typing import Any

from mergebot.config.moe import MoeConfig
from mergebot.merge.io import DType
from mergebot.merge.moe_layout import DEEPSEEK, MIXTRAL, QWEN
from mergebot.merge.source import InputModel

DEEPSEEK_REMOTE = "deepseek-ai/deepseek-moe-16b-base--"
DTYPE_KEYS = ("torch_dtype", "dtype")


def moe_model_config(architecture: str, config: MoeConfig, base: InputModel, dtype: DType | None) -> dict[str, Any]:
    """The output's config.json as a dict (remote-code pointers still in; the writer drops them)."""
    result = dict(base.config)
    experts, per_token = len(config.experts), config.experts_per_token
    if architecture == MIXTRAL:
        result |= {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": experts,
            "num_experts_per_tok": per_token,
            "sliding_window": None,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
        }
    elif architecture == QWEN:
        result |= {
            "architectures": ["Qwen2MoeForCausalLM"],
            "model_type": "qwen2_moe",
            "num_experts": experts,
            "num_experts_per_tok": per_token,
            "decoder_sparse_step": 1,
            "norm_topk_prob": True,
            "sliding_window": None,
            "use_sliding_window": False,
            "shared_expert_intermediate_size": result["intermediate_size"],
            "moe_intermediate_size": result["intermediate_size"],
            "mlp_only_layers": [],
            "qkv_bias": True,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }
    else:
        assert architecture == DEEPSEEK
        result |= {
            "architectures": ["DeepseekForCausalLM"],
            "model_type": "deepseek",
            "n_routed_experts": experts,
            "n_shared_experts": len(config.shared_experts) or None,
            "num_experts_per_tok": per_token,
            "first_k_dense_replace": 0,
            "moe_layer_freq": 1,
            "scoring_func": "softmax",
            "norm_topk_prob": True,
            "moe_intermediate_size": result["intermediate_size"],
            "auto_map": {
                "AutoConfig": DEEPSEEK_REMOTE + "configuration_deepseek.DeepseekConfig",
                "AutoModel": DEEPSEEK_REMOTE + "modeling_deepseek.DeepseekModel",
                "AutoModelForCausalLM": DEEPSEEK_REMOTE + "modeling_deepseek.DeepseekForCausalLM",
            },
        }
    if dtype is not None:
        for key in [k for k in DTYPE_KEYS if k in result] or ["dtype"]:
            result[key] = dtype.torch_name
    return result
