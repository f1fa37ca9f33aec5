"""Configuration of the Nemotron 3 hybrid model, read from and written to HF ``NemotronHConfig``
``config.json`` files (``hybrid_override_pattern`` or ``layers_block_type``, and the legacy
``mamba_*`` keys).

The layer pattern is a string, one letter per layer: ``M`` Mamba-2, ``*`` attention, ``E`` MoE,
``-`` dense MLP. :attr:`NemotronConfig.layer_types` gives the block type of each layer index.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .. import scratch

PATTERN_LETTERS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
LETTER_OF = {v: k for k, v in PATTERN_LETTERS.items()}
# HF layer-type names (current and legacy) -> pattern letter
_HF_TYPE_TO_LETTER = {
    "linear_attention": "M", "mamba": "M",
    "full_attention": "*", "attention": "*",
    "moe": "E",
    "mlp": "-",
}
_LETTER_TO_HF_TYPE = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}

# legacy config.json key -> field name
_LEGACY_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
    "mtp_hybrid_override_pattern": "mtp_pattern",
}


def check_pattern(pattern: str, what: str = "hybrid_override_pattern") -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} must be a non-empty string of layer letters (M * E -), got {pattern!r}")
    bad = sorted({c for c in pattern if c not in PATTERN_LETTERS})
    if bad:
        pos = pattern.index(bad[0])
        raise ValueError(
            f"{what}: unknown layer letter(s) {', '.join(repr(c) for c in bad)} (first at position {pos}); "
            f"allowed: 'M' mamba, '*' attention, 'E' moe, '-' mlp"
        )
    return pattern


def _types_to_pattern(types, what: str) -> str:
    if not isinstance(types, (list, tuple)):
        raise ValueError(f"{what} must be a list of layer type names, got {type(types).__name__}")
    out = []
    for i, t in enumerate(types):
        if t not in _HF_TYPE_TO_LETTER:
            raise ValueError(f"{what}[{i}]: unknown layer type {t!r}; allowed: {sorted(_HF_TYPE_TO_LETTER)}")
        out.append(_HF_TYPE_TO_LETTER[t])
    return "".join(out)


def _as_float(v) -> float:
    """A JSON number, "Infinity", or HF's ``{"__float__": "Infinity"}`` encoding."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


@dataclass
class NemotronConfig:
    """Hyper-parameters of a Nemotron-H / Nemotron 3 hybrid model (field names follow HF)."""

    vocab_size: int = 131072
    hidden_size: int = 4096
    hybrid_override_pattern: str = "M*E-"
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    # dense MLP
    intermediate_size: int = 21504
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    expand: int = 2
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_hidden_act: str = "silu"
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple = (0.0, float("inf"))
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_shared_experts: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = "*E"
    mtp_depths: int = 2
    mtp_loss_scale: float = 0.3
    # misc
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    residual_in_fp32: bool = False
    tie_word_embeddings: bool = False
    use_bias: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    torch_dtype: str = "bfloat16"
    # keys of a config.json this class does not model, kept for a faithful round trip
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # ---- derived -------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> list[str]:
        """Block type of each layer index: 'mamba', 'attention', 'moe' or 'mlp'."""
        return [PATTERN_LETTERS[c] for c in self.hybrid_override_pattern]

    @property
    def mtp_layer_types(self) -> list[str]:
        return [PATTERN_LETTERS[c] for c in self.mtp_pattern]

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_size(self) -> int:
        return 2 * self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size + self.mamba_num_heads

    @property
    def moe_expert_dim(self) -> int:
        """Width the routed experts work in (the latent size for LatentMoE, else hidden)."""
        return self.moe_latent_size if self.moe_latent_size else self.hidden_size

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        check_pattern(self.hybrid_override_pattern)
        if self.num_nextn_predict_layers:
            check_pattern(self.mtp_pattern, "mtp_hybrid_override_pattern")
        pos = {"vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size",
               "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size"}
        for name in pos:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config: {name} must be a positive integer, got {v!r}")
        types = set(self.hybrid_override_pattern) | (set(self.mtp_pattern) if self.num_nextn_predict_layers else set())
        if "*" in types and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}")
        if "M" in types:
            if self.mamba_num_heads % self.n_groups:
                raise ValueError(
                    f"config: mamba_num_heads={self.mamba_num_heads} is not divisible by n_groups={self.n_groups}")
        if "E" in types:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"config: num_experts_per_tok={self.num_experts_per_tok} exceeds "
                    f"n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
                raise ValueError(
                    f"config: n_routed_experts={self.n_routed_experts} must divide into n_group={self.n_group} "
                    f"groups with topk_group={self.topk_group} <= n_group")
            if self.moe_latent_size is not None and self.moe_latent_size <= 0:
                raise ValueError(f"config: moe_latent_size must be positive or null, got {self.moe_latent_size}")
        if self.num_nextn_predict_layers < 0 or self.mtp_depths < 1:
            raise ValueError("config: num_nextn_predict_layers must be >= 0 and mtp_depths >= 1")

    def check_block_dims(self, multiple: int = 16, what: str = "nvfp4") -> None:
        """Raise if a Linear input width is not a multiple of ``multiple`` (NVFP4 blocks of 16)."""
        dims = {"hidden_size": self.hidden_size}
        types = set(self.hybrid_override_pattern) | (set(self.mtp_pattern) if self.num_nextn_predict_layers else set())
        if "M" in types:
            dims["mamba_num_heads*mamba_head_dim"] = self.mamba_intermediate_size
        if "*" in types:
            dims["num_attention_heads*head_dim"] = self.num_attention_heads * self.head_dim
        if "-" in types:
            dims["intermediate_size"] = self.intermediate_size
        if "E" in types:
            dims["moe_intermediate_size"] = self.moe_intermediate_size
            dims["moe_shared_expert_intermediate_size"] = self.moe_shared_expert_intermediate_size
            if self.moe_latent_size:
                dims["moe_latent_size"] = self.moe_latent_size
        for k, v in dims.items():
            if v % multiple:
                raise ValueError(f"config: {k}={v} is not a multiple of {multiple}, required by {what}")

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "NemotronConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)} - {"extra", "hybrid_override_pattern", "mtp_pattern"}
        kw: dict = {}
        for old, new in _LEGACY_KEYS.items():
            if old in d:
                v = d.pop(old)
                if new not in d:
                    d[new] = v
        # layer pattern: explicit pattern wins, else the list of block types
        pattern = d.pop("hybrid_override_pattern", None)
        types = d.pop("layers_block_type", None)
        if types is None:
            types = d.pop("layer_types", None)
        if pattern is None and types is not None:
            pattern = _types_to_pattern(types, "layers_block_type")
        if pattern is None:
            raise ValueError("config: needs hybrid_override_pattern or layers_block_type")
        check_pattern(pattern)
        kw["hybrid_override_pattern"] = pattern
        n_layers = d.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != len(pattern):
            raise ValueError(
                f"config: num_hidden_layers={n_layers} does not match the {len(pattern)} letters of the layer pattern")
        mtp = d.pop("mtp_pattern", None)
        mtp_types = d.pop("mtp_layers_block_type", None)
        if mtp is None and mtp_types is not None:
            mtp = _types_to_pattern(mtp_types, "mtp_layers_block_type")
        if mtp is not None:
            kw["mtp_pattern"] = mtp
        for k in list(d):
            if k in known:
                kw[k] = d.pop(k)
        if "time_step_limit" in kw:
            kw["time_step_limit"] = tuple(_as_float(v) for v in kw["time_step_limit"])
        if "mamba_num_heads" not in kw and "hidden_size" in kw:
            # old configs give expand and head_dim only
            head_dim = kw.get("mamba_head_dim", cls.mamba_head_dim)
            kw["mamba_num_heads"] = kw.get("expand", cls.expand) * kw["hidden_size"] // head_dim
        if d.get("model_type", "nemotron_h") == "nemotron_h":
            d.pop("model_type", None)
        if d.get("architectures") == ["NemotronHForCausalLM"]:
            d.pop("architectures")
        kw["extra"] = d
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d["time_step_limit"] = list(self.time_step_limit)
        d["mtp_hybrid_override_pattern"] = d.pop("mtp_pattern")
        d["layers_block_type"] = [_LETTER_TO_HF_TYPE[c] for c in self.hybrid_override_pattern]
        d["mtp_layers_block_type"] = [_LETTER_TO_HF_TYPE[c] for c in self.mtp_pattern]
        d["num_hidden_layers"] = self.num_hidden_layers
        out = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        out.update(extra)
        out.update(d)
        return out

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "NemotronConfig":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"config: no such file {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {p} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{p}: {e}") from None

    def save_json(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "config.json"
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".config.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        scratch.publish(tmp)  # mkstemp made it 0600
        os.replace(tmp, p)
        return p

    @classmethod
    def check_fields(cls, names, what: str = "config field") -> None:
        """Raise ``ValueError`` naming any of ``names`` that is not a settable field, with the valid ones."""
        valid = sorted(f.name for f in fields(cls) if f.name != "extra")
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown {what}{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                             f"valid fields: {', '.join(valid)}")

    def replace(self, **changes) -> "NemotronConfig":
        self.check_fields(changes)
        d = asdict(self)
        d.update(changes)
        return type(self)(**d)
