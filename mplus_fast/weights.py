"""The model's fixed weights, organised by layer, with the two LoRA adapters kept apart.

Upstream names (SPEC §8) are mapped here, in one place: `expected_weight_shapes(config)` is the
full list of backbone/selector/adapter tensors a checkpoint must hold, `Weights.from_tensors`
builds the structure, `Weights.to_tensors` writes the same names back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mplus_fast.config import MPlusConfig

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SELECTORS = ("query_proj", "key_proj", "encoder_query_proj")
ENCODER_ADAPTER = "default"
DECODER_ADAPTER = "decoder_adapter"


@dataclass
class LoraLinear:
    """y = x W^T + scale · (x A^T) B^T for the active adapter (peft's side path, kept unmerged
    so float32 and bf16 results follow the reference's arithmetic)."""
    weight: torch.Tensor                                   # (out, in)
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (A (r,in), B (out,r))
    scale: float = 0.0
    # Where `effective_weight` builds merged copies; None: where the weight is. Set when the
    # original waits in host memory (kept only for saving) while the model computes on a GPU:
    # the merged copy is made there, one projection at a time (`mplus_fast.loading`).
    merge_device: torch.device | None = None

    def __call__(self, x: torch.Tensor, adapter: str | None) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight)
        if adapter is not None and adapter in self.adapters:
            a, b = self.adapters[adapter]
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * self.scale
        return y

    def effective_weight(self, adapter: str | None) -> torch.Tensor:
        """W + scale · B A: the merged projection for one adapter (used by fast paths)."""
        w = self.weight if self.merge_device is None else self.weight.to(self.merge_device)
        if adapter is None or adapter not in self.adapters:
            return w
        a, b = (x.to(w.device) for x in self.adapters[adapter])
        delta = (b.float() @ a.float() * self.scale).to(w.dtype)
        return w.add_(delta) if w is not self.weight else w + delta   # a fresh device copy is merged in place


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    o_proj: torch.Tensor
    proj: dict[str, LoraLinear]
    selectors: dict[str, list[torch.Tensor]]  # name -> [W0 (2s,d), W2 (s,2s)] or [W (s,d)]


@dataclass
class Weights:
    embed: torch.Tensor          # (V, d)
    lm_head: torch.Tensor        # (V, d)
    final_norm: torch.Tensor     # (d,)
    bos: torch.Tensor            # (L, d)
    new_memory_pos: torch.Tensor  # (d,)
    layers: list[LayerWeights]

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_tensors(cls, config: MPlusConfig, t: dict[str, torch.Tensor]) -> "Weights":
        layers = []
        scale = config.lora_scale
        targets = lora_targets(config)
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            proj = {}
            for name, block in PROJECTIONS.items():
                base = f"{p}{block}.{name}"
                if name in targets:
                    adapters = {a: (t[f"{base}.lora_A.{a}.weight"], t[f"{base}.lora_B.{a}.weight"]) for a in adapter_names(config)}
                    proj[name] = LoraLinear(t[f"{base}.base_layer.weight"], adapters, scale)
                else:
                    proj[name] = LoraLinear(t[f"{base}.weight"])
            selectors = {}
            if config.is_mplus:
                for sel in SELECTORS:
                    idxs = (0, 2) if config.num_selector_layers == 2 else (None,)
                    key = lambda j: f"{p}self_attn.{sel}.{j}.weight" if j is not None else f"{p}self_attn.{sel}.weight"
                    if all(key(j) in t for j in idxs):
                        selectors[sel] = [t[key(j)] for j in idxs]
            layers.append(LayerWeights(t[f"{p}input_layernorm.weight"], t[f"{p}post_attention_layernorm.weight"],
                                       t[f"{p}self_attn.o_proj.weight"], proj, selectors))
        lm_head = t["model.embed_tokens.weight"] if config.tie_word_embeddings and "lm_head.weight" not in t else t["lm_head.weight"]
        return cls(t["model.embed_tokens.weight"], lm_head, t["model.norm.weight"],
                   t["bos_embedding"].reshape(config.num_hidden_layers, config.hidden_size),
                   t["new_memory_positional_emb"].reshape(config.hidden_size), layers)

    def to_tensors(self, config: MPlusConfig) -> dict[str, torch.Tensor]:
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm,
               "bos_embedding": self.bos.reshape(config.num_hidden_layers, 1, config.hidden_size),
               "new_memory_positional_emb": self.new_memory_pos.reshape(1, 1, config.hidden_size)}
        if not (config.tie_word_embeddings and self.lm_head is self.embed):
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[f"{p}input_layernorm.weight"] = layer.input_norm
            out[f"{p}post_attention_layernorm.weight"] = layer.post_norm
            out[f"{p}self_attn.o_proj.weight"] = layer.o_proj
            for name, block in PROJECTIONS.items():
                lin, base = layer.proj[name], f"{p}{block}.{name}"
                if lin.adapters:
                    out[f"{base}.base_layer.weight"] = lin.weight
                    for a, (wa, wb) in lin.adapters.items():
                        out[f"{base}.lora_A.{a}.weight"] = wa
                        out[f"{base}.lora_B.{a}.weight"] = wb
                else:
                    out[f"{base}.weight"] = lin.weight
            for sel, ws in layer.selectors.items():
                if len(ws) == 2:
                    out[f"{p}self_attn.{sel}.0.weight"], out[f"{p}self_attn.{sel}.2.weight"] = ws
                else:
                    out[f"{p}self_attn.{sel}.weight"] = ws[0]
        return out

    def map(self, fn) -> "Weights":
        """A copy with `fn` applied to every tensor (dtype / device moves)."""
        def lin(l: LoraLinear) -> LoraLinear:
            return LoraLinear(fn(l.weight), {a: (fn(x), fn(y)) for a, (x, y) in l.adapters.items()}, l.scale)
        layers = [LayerWeights(fn(l.input_norm), fn(l.post_norm), fn(l.o_proj), {k: lin(v) for k, v in l.proj.items()},
                               {k: [fn(w) for w in ws] for k, ws in l.selectors.items()}) for l in self.layers]
        tied = self.lm_head is self.embed
        embed = fn(self.embed)
        return Weights(embed, embed if tied else fn(self.lm_head), fn(self.final_norm), fn(self.bos), fn(self.new_memory_pos), layers)

    def merge_adapted_on(self, device) -> None:
        """Make the adapted projections build their merged copies on `device` (their base
        weights stay where they are: in host memory, for saving)."""
        for layer in self.layers:
            for lin in layer.proj.values():
                if lin.adapters:
                    lin.merge_device = torch.device(device)

    def move_projections(self, device) -> None:
        """Move the adapted projections (base weights and LoRA A/B) to `device`, in place. The fast
        backend computes with merged copies and keeps these originals only to save the upstream
        layout, so on a GPU they wait in host memory."""
        for layer in self.layers:
            for lin in layer.proj.values():
                lin.weight = lin.weight.to(device)
                lin.adapters = {a: (x.to(device), y.to(device)) for a, (x, y) in lin.adapters.items()}

    def nbytes(self) -> int:
        total = 0
        for t in self.to_tensors_flat():
            total += t.numel() * t.element_size()
        return total

    def to_tensors_flat(self):
        seen = set()
        for t in [self.embed, self.lm_head, self.final_norm, self.bos, self.new_memory_pos]:
            if id(t) not in seen:
                seen.add(id(t))
                yield t
        for l in self.layers:
            yield from (l.input_norm, l.post_norm, l.o_proj)
            for lin in l.proj.values():
                yield lin.weight
                for a, b in lin.adapters.values():
                    yield from (a, b)
            for ws in l.selectors.values():
                yield from ws


def lora_targets(config: MPlusConfig) -> set[str]:
    if not config.lora_config:
        return set()
    targets = config.lora_config.get("target_modules") or list(PROJECTIONS)
    return {t for t in targets if t in PROJECTIONS}


def adapter_names(config: MPlusConfig) -> list[str]:
    if not config.lora_config:
        return []
    return [ENCODER_ADAPTER, DECODER_ADAPTER] if config.add_decoder_lora else [ENCODER_ADAPTER]


def reading_adapter(config: MPlusConfig) -> str | None:
    """The adapter active for reads and generation (SPEC §1)."""
    if not config.lora_config:
        return None
    return DECODER_ADAPTER if config.add_decoder_lora else ENCODER_ADAPTER


def writing_adapter(config: MPlusConfig) -> str | None:
    return ENCODER_ADAPTER if config.lora_config else None


def expected_weight_shapes(config: MPlusConfig) -> dict[str, tuple[int, ...]]:
    """Every fixed tensor a checkpoint of this config must hold, with its shape."""
    d, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,),
              "bos_embedding": (config.num_hidden_layers, 1, d), "new_memory_positional_emb": (1, 1, d)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    io = {"q_proj": (q_out, d), "k_proj": (kv_out, d), "v_proj": (kv_out, d),
          "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    targets, r = lora_targets(config), (config.lora_config or {}).get("r", 0)
    s = config.selector_hidden_dim
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
        shapes[f"{p}self_attn.o_proj.weight"] = (d, q_out)
        for name, block in PROJECTIONS.items():
            out_f, in_f = io[name]
            base = f"{p}{block}.{name}"
            if name in targets:
                shapes[f"{base}.base_layer.weight"] = (out_f, in_f)
                for a in adapter_names(config):
                    shapes[f"{base}.lora_A.{a}.weight"] = (r, in_f)
                    shapes[f"{base}.lora_B.{a}.weight"] = (out_f, r)
            else:
                shapes[f"{base}.weight"] = (out_f, in_f)
        if config.is_mplus:
            sels = ["query_proj", "key_proj"] + (["encoder_query_proj"] if config.add_encoder_retriever else [])
            for sel in sels:
                if config.num_selector_layers == 2:
                    shapes[f"{p}self_attn.{sel}.0.weight"] = (2 * s, d)
                    shapes[f"{p}self_attn.{sel}.2.weight"] = (s, 2 * s)
                else:
                    shapes[f"{p}self_attn.{sel}.weight"] = (s, d)
    return shapes
