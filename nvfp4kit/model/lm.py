"""The Nemotron 3 hybrid causal LM: backbone of pattern blocks, untied ``lm_head``, optional MTP.

Module names equal the released checkpoint names (``backbone.layers.{i}.mixer.in_proj``,
``mtp.layers.0.eh_proj``, ...), so ``state_dict()`` maps 1:1 onto the released layout.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..losses import shifted_cross_entropy
from .attention import KVCache
from .blocks import Block
from .config import NemotronConfig
from .linear import make_linear
from .mamba2 import MambaState
from .mtp import MTP
from .norms import RMSNorm

_OUTPUT_PROJ = ("out_proj", "o_proj", "down_proj", "fc2_latent_proj")


@dataclass
class LMOutput:
    logits: torch.Tensor
    hidden: torch.Tensor
    loss: torch.Tensor | None = None
    main_loss: torch.Tensor | None = None
    mtp_losses: list = field(default_factory=list)
    mtp_logits: list = field(default_factory=list)


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


class ModelCache:
    """Decode state of the whole model: one entry per layer (KV cache, Mamba state or None) and
    the KV caches of each MTP depth."""

    def __init__(self, layers: list, mtp: dict | None = None):
        self.layers = layers
        self.mtp = mtp or {}
        self._marks = None

    def begin_record(self) -> None:
        """Start a forward whose tokens may be partly rolled back with :meth:`keep`."""
        self._marks = []
        for s in self.layers:
            if isinstance(s, KVCache):
                self._marks.append(s.length)
            else:
                self._marks.append(None)
                if isinstance(s, MambaState):
                    s.record = True

    def keep(self, n_tokens: int) -> None:
        """Keep only the first ``n_tokens`` tokens of the recorded forward."""
        if self._marks is None:
            raise RuntimeError("ModelCache.keep: begin_record was not called")
        for s, m in zip(self.layers, self._marks):
            if isinstance(s, KVCache):
                s.crop(m + n_tokens)
            elif isinstance(s, MambaState):
                s.keep(n_tokens)
                s.record = False
        self._marks = None


class Backbone(torch.nn.Module):
    def __init__(self, config: NemotronConfig, device=None, dtype=None):
        super().__init__()
        self.embeddings = torch.nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = torch.nn.ModuleList(
            Block(config, bt, i, device=device, dtype=dtype) for i, bt in enumerate(config.layer_types))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        h = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, None if cache is None else cache.layers[i])
        return self.norm_f(h)


class NemotronForCausalLM(torch.nn.Module):
    def __init__(self, config: NemotronConfig, device=None, dtype=None):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = make_linear(config.hidden_size, config.vocab_size, device=device, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.mtp = MTP(config, device=device, dtype=dtype) if config.num_nextn_predict_layers else None

    # ---- structure -----------------------------------------------------------------------------
    @property
    def layer_types(self) -> list[str]:
        return self.config.layer_types

    def layer_of(self, name: str) -> tuple[str, int | None, str | None]:
        """``(part, index, block_type)`` of a parameter/module name: part is 'backbone', 'mtp' or
        'head'; e.g. ``backbone.layers.3.mixer.in_proj`` -> ('backbone', 3, 'mamba')."""
        m = re.match(r"^(backbone|mtp)\.layers\.(\d+)(\.|$)", name)
        if m:
            i = int(m.group(2))
            types = self.config.layer_types if m.group(1) == "backbone" else (
                self.config.mtp_layer_types * max(1, self.config.num_nextn_predict_layers))
            if i >= len(types):
                raise ValueError(f"layer_of: {name!r} names layer {i}, the model has {len(types)}")
            return m.group(1), i, types[i]
        if name.startswith("backbone.") or name.startswith("lm_head"):
            return ("head" if name.startswith("lm_head") else "backbone"), None, None
        raise ValueError(f"layer_of: {name!r} is not a module of this model")

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "NemotronForCausalLM":
        """Random initialisation (normal(0, initializer_range); residual output projections scaled by
        1/sqrt(2 * layers); Mamba A/D/dt as in Mamba-2). A no-op on the meta device."""
        if self.lm_head.weight.device.type == "meta":
            return self
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        n_layers = self.config.num_hidden_layers
        for name, mod in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, torch.nn.Linear):
                s = std / math.sqrt(2 * n_layers) if leaf in _OUTPUT_PROJ else std
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * s)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            elif leaf == "gate" and hasattr(mod, "e_score_correction_bias"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                mod.e_score_correction_bias.zero_()
            elif hasattr(mod, "A_log"):
                mod.init_weights(self.config, generator=g)
        return self

    # ---- forward -------------------------------------------------------------------------------
    def new_cache(self, batch: int, device=None, dtype=None) -> ModelCache:
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        layers = [b.new_state(batch, device=device, dtype=dtype) for b in self.backbone.layers]
        return ModelCache(layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: ModelCache | None = None,
                mtp_depths: int | None = None, logits_to_keep: int = 0) -> LMOutput:
        """Logits of every position (or the last ``logits_to_keep``). With ``labels`` (the input ids,
        -100 to ignore; shifted here), also the loss ``main + sum_d (mtp_loss_scale / depths) * CE_d``.
        MTP runs for ``mtp_depths`` depths (default: ``config.mtp_depths`` when labels are given)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        h = self.backbone(input_ids, cache)
        hk = h if not logits_to_keep else h[:, -logits_to_keep:]
        logits = self.lm_head(hk)
        out = LMOutput(logits=logits, hidden=h)
        if mtp_depths is None:
            mtp_depths = self.config.mtp_depths if (labels is not None and self.mtp is not None) else 0
        if mtp_depths and self.mtp is None:
            raise ValueError("mtp_depths > 0 but the config has num_nextn_predict_layers = 0")
        if mtp_depths:
            emb = self.backbone.embeddings(input_ids)
            prev = h
            for d in range(1, mtp_depths + 1):
                emb_d = F.pad(emb[:, d:], (0, 0, 0, d))  # embedding of the token at t + d
                prev = self.mtp(prev, emb_d, d)
                out.mtp_logits.append(self.lm_head(prev))
        if labels is not None:
            out.main_loss = shifted_cross_entropy(logits if not logits_to_keep else self.lm_head(h), labels, 1)
            loss = out.main_loss
            for d, lg in enumerate(out.mtp_logits, start=1):
                ce = shifted_cross_entropy(lg, labels, d + 1)
                out.mtp_losses.append(ce)
                loss = loss + (self.config.mtp_loss_scale / mtp_depths) * ce
            out.loss = loss
        return out

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation using the decode caches."""
        b = input_ids.shape[0]
        cache = self.new_cache(b)
        logits = self(input_ids, cache=cache, logits_to_keep=1).logits[:, -1]
        out = [input_ids]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = _pick(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self(nxt[:, None], cache=cache).logits[:, -1]
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def speculative_generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, num_draft: int | None = None,
                             eos_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
        """Greedy self-speculative decoding: the MTP module drafts ``num_draft`` tokens (recursive
        depths), the main model verifies them in one forward. The output equals :meth:`generate`'s
        greedy output; the stats report how many drafts were accepted."""
        if self.mtp is None:
            raise ValueError("speculative_generate needs MTP layers (num_nextn_predict_layers > 0)")
        if input_ids.shape[0] != 1:
            raise ValueError("speculative_generate decodes one sequence at a time (batch 1)")
        D = num_draft or self.config.mtp_depths
        n_prompt = input_ids.shape[1]
        emb = self.backbone.embeddings
        cache = self.new_cache(1)
        h = self.backbone(input_ids, cache)
        tokens = input_ids[0].tolist()
        tokens.append(int(self.lm_head(h[:, -1]).argmax(-1)))
        hist = {0: h}  # depth -> outputs at positions 0..len-1 (depth 0: the main model)
        mtp_states = {d: self.mtp.new_states(d, 1, device=h.device, dtype=h.dtype) for d in range(1, D + 1)}
        mtp_len = {d: 0 for d in range(1, D + 1)}
        stats = SpeculativeStats()
        dev = input_ids.device
        while len(tokens) - n_prompt < max_new_tokens and not (eos_token_id is not None and eos_token_id in
                                                                  tokens[n_prompt:]):
            n = len(tokens) - 1  # the main cache covers tokens[:n]; tokens[n] is confirmed, not yet fed
            drafts: list[int] = []
            for d in range(1, D + 1):
                start = mtp_len[d]
                seq = tokens + drafts
                hin = hist[d - 1][:, start:n]
                e = emb(torch.tensor([seq[start + d:n + d]], device=dev))
                o = self.mtp(hin, e, d, mtp_states[d])
                hist[d] = torch.cat([hist[d][:, :start], o], dim=1) if d in hist else o
                drafts.append(int(self.lm_head(o[:, -1]).argmax(-1)))
            for d in range(1, D + 1):  # keep only positions whose inputs were all confirmed
                keep = n - d + 1
                for s in mtp_states[d]:
                    if isinstance(s, KVCache):
                        s.crop(keep)
                hist[d] = hist[d][:, :keep]
                mtp_len[d] = keep
            block = torch.tensor([[tokens[n]] + drafts], device=dev)
            cache.begin_record()
            hv = self.backbone(block, cache)
            preds = self.lm_head(hv)[0].argmax(-1).tolist()
            j = 0
            while j < D and preds[j] == drafts[j]:
                j += 1
            cache.keep(1 + j)
            hist[0] = torch.cat([hist[0], hv[:, :1 + j]], dim=1)
            tokens.extend(drafts[:j] + [preds[j]])
            stats.rounds += 1
            stats.drafted += D
            stats.accepted += j
        new = tokens[n_prompt:n_prompt + max_new_tokens]
        if eos_token_id is not None and eos_token_id in new:
            new = new[:new.index(eos_token_id) + 1]
        return torch.tensor([input_ids[0].tolist() + new], device=dev), stats


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    lg = logits.float() / temperature
    if top_k:
        kth = lg.topk(top_k, dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    return torch.multinomial(torch.softmax(lg, -1), 1, generator=generator)[:, 0]


def build_model(config: NemotronConfig | str, *, device=None, dtype=None, seed: int = 0, **overrides):
    """A randomly initialised model from a config or a preset name (meta device: no allocation)."""
    if isinstance(config, str):
        from .presets import get_preset

        config = get_preset(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    model = NemotronForCausalLM(config, device=device, dtype=dtype)
    return model.init_weights(seed)
