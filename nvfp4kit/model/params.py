"""Parameter counts (total and active per token) of a model or config, on the meta device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import NemotronConfig


@dataclass
class ParamCounts:
    total: int  # backbone + lm_head (MTP excluded, as published)
    active: int  # per token: every weight except the routed experts a token does not visit
    mtp_total: int
    mtp_active: int
    by_block: dict = field(default_factory=dict)  # block type / part -> total parameters

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_total


def _moe_inactive(mixer) -> int:
    per_expert = sum(p.numel() for p in mixer.experts[0].parameters())
    return per_expert * (mixer.gate.num_experts - mixer.gate.top_k)


def count_parameters(model_or_config) -> ParamCounts:
    """Counts for a model, or for a config (the model is built on the meta device: no allocation)."""
    from .lm import NemotronForCausalLM

    if isinstance(model_or_config, NemotronConfig):
        model = NemotronForCausalLM(model_or_config, device="meta")
    else:
        model = model_or_config
    by_block: dict[str, int] = {}

    def numel(mod) -> int:
        return sum(p.numel() for p in mod.parameters())

    def add(key, n):
        by_block[key] = by_block.get(key, 0) + n

    add("embeddings", model.backbone.embeddings.weight.numel())
    inactive = 0
    for blk in model.backbone.layers:
        if blk.block_type == "moe":
            # experts are identical in shape: count one, not tens of thousands of modules
            mixer = blk.mixer
            n = (numel(blk.norm) + numel(mixer.gate) + numel(mixer.shared_experts)
                 + numel(mixer.experts[0]) * len(mixer.experts))
            if mixer.latent:
                n += numel(mixer.fc1_latent_proj) + numel(mixer.fc2_latent_proj)
            add("moe", n)
            inactive += _moe_inactive(mixer)
        else:
            add(blk.block_type, numel(blk))
    add("norm_f", model.backbone.norm_f.weight.numel())
    if model.lm_head.weight is not model.backbone.embeddings.weight:
        add("head", model.lm_head.weight.numel())
    total = sum(by_block.values())
    mtp_total = mtp_inactive = 0
    if model.mtp is not None:
        mtp_total = sum(p.numel() for p in model.mtp.parameters())
        for blk in model.mtp.layers:
            if blk.block_type == "moe":
                mtp_inactive += _moe_inactive(blk.mixer)
    return ParamCounts(total, total - inactive, mtp_total, mtp_total - mtp_inactive, by_block)


def checkpoint_tensors(config: NemotronConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor name of the released checkpoint layout with its shape and dtype (meta device;
    floating tensors in ``config.torch_dtype``, the router score-correction bias in fp32)."""
    from .lm import NemotronForCausalLM

    dtype = getattr(torch, str(config.torch_dtype).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"config: torch_dtype {config.torch_dtype!r} is not a floating torch dtype")
    model = NemotronForCausalLM(config, device="meta", dtype=dtype)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
