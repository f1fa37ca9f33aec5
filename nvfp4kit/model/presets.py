"""Named configurations: the released Nemotron 3 sizes and small ones for CPU work.

The small presets keep every Linear dimension a multiple of 16 (NVFP4 blocks), like the released ones.
"""

from __future__ import annotations

from .config import NemotronConfig

SUPER_PATTERN = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

_COMMON = dict(
    vocab_size=131072, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
    mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128,
    norm_topk_prob=True, n_group=1, topk_group=1, layer_norm_epsilon=1e-5, max_position_embeddings=262144,
    tie_word_embeddings=False,
)

PRESETS: dict[str, dict] = {
    "nemotron3-super-120b-a12b": dict(
        _COMMON, hidden_size=4096, hybrid_override_pattern=SUPER_PATTERN, mamba_num_heads=128,
        n_routed_experts=512, num_experts_per_tok=22, moe_intermediate_size=2688, moe_latent_size=1024,
        moe_shared_expert_intermediate_size=5376, routed_scaling_factor=5.0, intermediate_size=5376,
        num_nextn_predict_layers=1, mtp_pattern="*E",
    ),
    "nemotron3-nano-30b-a3b": dict(
        _COMMON, hidden_size=2688, hybrid_override_pattern=NANO_PATTERN, mamba_num_heads=64,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856, moe_latent_size=None,
        moe_shared_expert_intermediate_size=3712, routed_scaling_factor=2.5, intermediate_size=3712,
        num_nextn_predict_layers=0,
    ),
    # every block type, LatentMoE and MTP, ~1.6M parameters: unit tests
    "micro": dict(
        vocab_size=512, hidden_size=128, hybrid_override_pattern="M*EM-E", num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=256, mamba_num_heads=16, mamba_head_dim=16,
        n_groups=2, ssm_state_size=32, conv_kernel=4, chunk_size=32, n_routed_experts=16,
        num_experts_per_tok=4, moe_intermediate_size=128, moe_latent_size=64,
        moe_shared_expert_intermediate_size=256, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        mtp_pattern="*E", max_position_embeddings=4096,
    ),
    # every block type, LatentMoE and MTP, ~10M parameters: CPU training and benchmarks
    "tiny": dict(
        vocab_size=4096, hidden_size=256, hybrid_override_pattern="M*EM-E", num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, intermediate_size=512, mamba_num_heads=16, mamba_head_dim=32,
        n_groups=2, ssm_state_size=64, conv_kernel=4, chunk_size=64, n_routed_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=256, moe_latent_size=128,
        moe_shared_expert_intermediate_size=512, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        mtp_pattern="*E", max_position_embeddings=4096,
    ),
    # a scaled-down Super layout (same letter rhythm, latent MoE, MTP), ~30M parameters
    "small": dict(
        vocab_size=8192, hidden_size=256, hybrid_override_pattern="MEM*EMEM*EME", num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, intermediate_size=512, mamba_num_heads=16, mamba_head_dim=32,
        n_groups=4, ssm_state_size=64, conv_kernel=4, chunk_size=64, n_routed_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=256, moe_latent_size=128,
        moe_shared_expert_intermediate_size=512, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
        mtp_pattern="*E", max_position_embeddings=4096,
    ),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides) -> NemotronConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    NemotronConfig.check_fields(overrides)
    d = dict(PRESETS[name])
    d.update(overrides)
    return NemotronConfig(**d)
