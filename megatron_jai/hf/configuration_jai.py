"""Hugging Face configuration of the JAI architecture (``model_type: "jai"``).

Copied into every JAI export and loaded with ``trust_remote_code=True``: this file imports only
``transformers``. The architecture is Phi-3's decoder (RMSNorm, RoPE, grouped-query attention,
SwiGLU, no biases) with, optionally, Mixtral-style experts and DUS.v2 long-range skips:

* ``skip_connections``: a list of ``{"source": s, "target": t, "alpha_train": a, "alpha_infer": b}``
  (0-based layer indices). The hidden state entering layer ``s`` is blended into the input of
  layer ``t``: ``h <- alpha * h_s + (1 - alpha) * h``, with ``alpha_train`` while the module is in
  training mode and ``alpha_infer`` in eval mode. When a layer is both a target and a source, the
  blended input is what is saved. Skips whose two alphas are 0 are ignored.
* ``num_local_experts`` > 0: every MLP is a mixture of experts (``block_sparse_moe``: router
  ``gate`` and experts ``experts.{e}.w1 / w3 / w2`` = gate / up / down, Mixtral's names). Routing:
  softmax over the router logits (fp32), the ``num_experts_per_tok`` largest of
  ``probs + expert_bias`` (``router_expert_bias``; the bias only steers the choice), weights = the
  chosen probabilities, renormalised to sum 1 when ``norm_topk_prob``. 0 experts: a dense SwiGLU
  MLP (``mlp.gate_proj / up_proj / down_proj``).
* ``rope_parameters``: ``{"rope_type": "default" | "linear", "rope_theta": base, "factor": f}``;
  "linear" is position interpolation (positions divided by ``factor``). Older ``rope_theta`` /
  ``rope_scaling`` keys are accepted.

Fields the model ignores but training reads back (``hf-to-mcore``): ``router_aux_loss_coef``,
``router_z_loss_coef``, ``expert_capacity_factor``, ``expert_drop_policy``,
``router_expert_bias_update_rate``, ``make_vocab_size_divisible_by``.
"""
from transformers import PretrainedConfig


class JaiConfig(PretrainedConfig):
    model_type = "jai"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Tensor-parallel plan (transformers' tp_plan="auto", vLLM's Transformers backend).
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        "layers.*.block_sparse_moe.experts.*.w1": "colwise",
        "layers.*.block_sparse_moe.experts.*.w3": "colwise",
        "layers.*.block_sparse_moe.experts.*.w2": "rowwise",
    }

    def __init__(self, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 head_dim=None, hidden_act="silu", max_position_embeddings=4096,
                 initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True,
                 tie_word_embeddings=False, rope_parameters=None, attention_dropout=0.0,
                 num_local_experts=0, num_experts_per_tok=2, norm_topk_prob=True,
                 router_expert_bias=False, skip_connections=(), bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, **kwargs):
        if hidden_act != "silu":
            raise ValueError(f"JAI models use silu (SwiGLU), got hidden_act={hidden_act!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.sliding_window = None  # full attention (read by transformers' mask helpers)
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.router_expert_bias = router_expert_bias
        self.skip_connections = [dict(s) for s in skip_connections]
        self.rope_parameters = _rope_parameters(rope_parameters, kwargs)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        for s in self.skip_connections:
            if not 0 <= s["source"] < s["target"] < num_hidden_layers:
                raise ValueError(f"skip connection {s['source']}->{s['target']} is outside the "
                                 f"{num_hidden_layers} layers")


def _rope_parameters(rope_parameters, kwargs) -> dict:
    """``rope_parameters``, or the older ``rope_theta`` / ``rope_scaling`` keys (popped from kwargs)."""
    theta = kwargs.pop("rope_theta", None)
    scaling = kwargs.pop("rope_scaling", None)
    params = dict(rope_parameters or scaling or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0 if theta is None else theta)
    if params["rope_type"] not in ("default", "linear"):
        raise ValueError(f"JAI models support RoPE types 'default' and 'linear', got "
                         f"{params['rope_type']!r}")
    if params["rope_type"] == "linear" and float(params.get("factor", 0)) <= 0:
        raise ValueError("linear RoPE scaling needs a positive 'factor'")
    return params
