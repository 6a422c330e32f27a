"""Hugging Face model of the JAI architecture: Phi-3's decoder with optional Mixtral-style experts
and DUS.v2 long-range skips (see ``configuration_jai.py`` for the exact semantics).

Copied into every JAI export and loaded with ``trust_remote_code=True``; imports only torch and
transformers. Written in the style of transformers' own Llama / Mixtral modeling so that the
attention interface (eager, SDPA, flash, flex, vLLM's Transformers backend), the KV cache
(``DynamicCache``), padding masks, ``generate()`` and gradient checkpointing work as for them.

Skips and the KV cache: a skip blends the hidden state of the *same token* from an earlier layer,
so every forward pass (a prompt, or one new token with the cache) computes its own sources before
their targets; nothing beyond the usual keys and values needs caching.

The experts module is an ``nn.ModuleList`` of per-expert ``w1 / w2 / w3`` linears called as
``experts(hidden_states, top_k_index, top_k_weights)``: the layout and call that Mixtral
checkpoints, mergekit and vLLM's Transformers backend (which swaps in its fused MoE) understand.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel

from .configuration_jai import JaiConfig


class JaiRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class JaiRotaryEmbedding(nn.Module):
    """cos/sin of RoPE for ``position_ids``; "linear" scaling divides the positions by ``factor``.
    The frequencies are recomputed on the fly (a handful of numbers), so no buffer needs
    initialising after a meta-device load."""

    def __init__(self, config: JaiConfig):
        super().__init__()
        params = config.rope_parameters
        self.base = float(params["rope_theta"])
        self.scale = float(params["factor"]) if params.get("rope_type") == "linear" else 1.0
        self.dim = config.head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=x.device) / self.dim
        inv_freq = 1.0 / (self.base ** exponent) / self.scale
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[b, kv_heads, s, d] -> [b, kv_heads * n_rep, s, d]."""
    if n_rep == 1:
        return hidden_states
    b, kv, s, d = hidden_states.shape
    return hidden_states[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class JaiAttention(nn.Module):
    def __init__(self, config: JaiConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class JaiMLP(nn.Module):
    """Dense SwiGLU MLP (Llama's names)."""

    def __init__(self, config: JaiConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class JaiExpert(nn.Module):
    """One expert (Mixtral's names): ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, config: JaiConfig):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(h, f, bias=False)
        self.w2 = nn.Linear(f, h, bias=False)
        self.w3 = nn.Linear(h, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class JaiExperts(nn.ModuleList):
    def __init__(self, config: JaiConfig):
        super().__init__([JaiExpert(config) for _ in range(config.num_local_experts)])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H]; the weighted sum over
        the k choices is accumulated in fp32."""
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            y = expert(hidden_states[token]).float() * top_k_weights[token, slot, None].float()
            out.index_add_(0, token, y)
        return out.to(hidden_states.dtype)


class JaiRouter(nn.Module):
    """Linear gate [E, H] in fp32: softmax, top-k of ``probs + expert_bias``, weights = the chosen
    probabilities (renormalised when ``norm_topk_prob``)."""

    def __init__(self, config: JaiConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        if config.router_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_local_experts))
        else:
            self.expert_bias = None

    def forward(self, hidden_states):
        probs = torch.softmax(F.linear(hidden_states.float(), self.weight.float()), dim=-1)
        scores = probs if self.expert_bias is None else probs + self.expert_bias.float()
        top_k_index = torch.topk(scores, self.top_k, dim=-1).indices
        top_k_weights = torch.gather(probs, 1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return top_k_index, top_k_weights


class JaiSparseMoeBlock(nn.Module):
    def __init__(self, config: JaiConfig):
        super().__init__()
        self.gate = JaiRouter(config)
        self.experts = JaiExperts(config)

    def forward(self, hidden_states):
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        top_k_index, top_k_weights = self.gate(tokens)
        return self.experts(tokens, top_k_index, top_k_weights).reshape(shape)


class JaiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: JaiConfig, layer_idx: int):
        super().__init__()
        self.self_attn = JaiAttention(config, layer_idx)
        self.input_layernorm = JaiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = JaiRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_local_experts:
            self.block_sparse_moe = JaiSparseMoeBlock(config)
        else:
            self.mlp = JaiMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                use_cache=False, position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                          attention_mask, cache=cache, position_ids=position_ids,
                                          **kwargs)
        hidden_states = residual + hidden_states
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return hidden_states + ffn(self.post_attention_layernorm(hidden_states))


class JaiPreTrainedModel(PreTrainedModel):
    config_class = JaiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["JaiDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, JaiRouter):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.expert_bias is not None:
                nn.init.zeros_(module.expert_bias)


class JaiModel(JaiPreTrainedModel):
    def __init__(self, config: JaiConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(JaiDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = JaiRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = JaiRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Skips by target layer; alpha 0 in both modes = no skip (as in training).
        self.skips_into = {}
        for s in config.skip_connections:
            if s["alpha_train"] or s["alpha_infer"]:
                self.skips_into.setdefault(s["target"], []).append(
                    (s["source"], float(s["alpha_train"]), float(s["alpha_infer"])))
        self.skip_sources = {src for skips in self.skips_into.values() for src, _, _ in skips}
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        return_dict = _pop_output_flags(kwargs)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
                            + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        saved = {}
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            for source, alpha_train, alpha_infer in self.skips_into.get(i, ()):
                alpha = alpha_train if self.training else alpha_infer
                if alpha:  # (.to: layers may sit on different devices with device_map)
                    hidden_states = (alpha * saved[source].to(hidden_states.device)
                                     + (1.0 - alpha) * hidden_states)
            if i in self.skip_sources:
                saved[i] = hidden_states
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids,
                                  cache=cache, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
        out = BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                      cache=cache if use_cache else None)
        return out if return_dict else out.to_tuple()


class JaiForCausalLM(JaiPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: JaiConfig):
        super().__init__(config)
        self.model = JaiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        return_dict = _pop_output_flags(kwargs)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, past_key_values=past_key_values, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)
        return out if return_dict else out.to_tuple()


def _pop_output_flags(kwargs: dict) -> bool:
    """Remove the output switches callers pass (this model returns neither attentions nor
    hidden states); returns ``return_dict``."""
    for key in ("output_attentions", "output_hidden_states"):
        kwargs.pop(key, None)
    return kwargs.pop("return_dict", None) is not False


__all__ = ["JaiPreTrainedModel", "JaiModel", "JaiForCausalLM"]
