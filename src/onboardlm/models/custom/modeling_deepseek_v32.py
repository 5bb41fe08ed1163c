"""Lean, export-friendly DeepseekV32 on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.deepseek_v32.modeling_deepseek_v32`` (DeepseekV32ForCausalLM):
pre-norm decoder layers with RMSNorm, rotary position embeddings (default, linear, llama3, yarn,
proportional), multi-head latent attention and mixture-of-experts feed-forward layers. Module names
equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: KV cache, attention masks (attention is causal), dropout, gradient
checkpointing, attention-implementation switches, ``repeat_kv`` (the attention op handles GQA),
position-id generation (callers pass them), hidden-state/attention outputs and the loss.
Linear and reshape calls carry tensor-parallel sharding hints; they do not change the numbers.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DeepseekV32Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


def _rope_inverse_frequencies(config: DeepseekV32Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scaling for the config's rope_type (static types only)."""
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        raise NotImplementedError(f"rope_type {rope_type!r} depends on the sequence length at run time")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return inv_freq, 1.0


@dataclass
class DeepseekV32CausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class DeepseekV32RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class DeepseekV32RotaryEmbedding(nn.Module):
    """cos/sin of ``position_ids * inv_freq``, computed in fp32 once per forward for all layers."""

    def __init__(self, config: DeepseekV32Config) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = _rope_inverse_frequencies(config)
        self.register_buffer("_ad_inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class DeepseekV32MLP(nn.Module):
    """Gated MLP of a shared expert or a dense layer (``intermediate_size`` defaults to the config's)."""

    def __init__(self, config: DeepseekV32Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, None, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up, self.down_proj.weight, None, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class DeepseekV32Expert(nn.Module):
    """One routed expert's weights; DeepseekV32MoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class DeepseekV32TopkRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on score + ``e_score_correction_bias`` among the experts of
    the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts).
    The chosen sigmoid scores (renormalised when norm_topk_prob) times ``routed_scaling_factor``
    are the routing weights. Computed in fp32.
    """

    def __init__(self, config: DeepseekV32Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))  # a checkpoint tensor

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        scores = torch.nn.functional.linear(hidden_states.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.topk_group, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, best_groups, 1.0)
        allowed = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
        choice = choice.masked_fill(allowed == 0, float("-inf"))
        selected = torch.topk(choice, k=self.top_k, dim=-1)[1]
        weights = scores.gather(1, selected)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return selected, weights * self.routed_scaling_factor


class DeepseekV32MoE(nn.Module):
    """Mixture of experts behind a sigmoid router with bias-corrected grouped top-k,
    plus the always-on `shared_experts`.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: DeepseekV32Config) -> None:
        super().__init__()
        self.gate = DeepseekV32TopkRouter(config)
        self.experts = nn.ModuleList(
            DeepseekV32Expert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_local_experts)
        )
        self.shared_experts = DeepseekV32MLP(
            config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
        )
        self._register_load_state_dict_pre_hook(self._unpack_packed_experts)

    def _unpack_packed_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: HF's packed ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
        [E, H, I] become per-expert ``experts.<e>.{gate,up,down}_proj`` keys; gate and up are
        the two halves of gate_up. Per-expert checkpoints load unchanged.
        """
        experts = f"{prefix}experts."
        gate_up = state_dict.pop(f"{experts}gate_up_proj", None)
        if gate_up is not None:
            _store_expert_tensors(state_dict, experts, "gate_proj.weight", gate_up.chunk(2, dim=1)[0])
            _store_expert_tensors(state_dict, experts, "up_proj.weight", gate_up.chunk(2, dim=1)[1])
        down = state_dict.pop(f"{experts}down_proj", None)
        if down is not None:
            _store_expert_tensors(state_dict, experts, "down_proj.weight", down)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        selected_experts, routing_weights = self.gate(tokens)
        out = torch.ops.auto_deploy.torch_moe(
            tokens,
            selected_experts,
            routing_weights,
            w1_weight=[expert.gate_proj.weight for expert in self.experts],
            w2_weight=[expert.down_proj.weight for expert in self.experts],
            w3_weight=[expert.up_proj.weight for expert in self.experts],
            is_gated_mlp=True,
            act_fn=ActivationType.Silu,
            layer_type="moe",
        )
        out = torch.ops.auto_deploy.all_reduce(out, layer_type="moe")
        shared = self.shared_experts(tokens)
        out = out + shared
        return out.reshape(hidden_states.shape)


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class DeepseekV32Indexer(nn.Module):
    """Lightning indexer of DeepSeek sparse attention: light query heads from the normed query latent
    and one LayerNorm'd key per token, both with half-split RoPE on their first
    ``qk_rope_head_dim`` channels, and one weight per head and query. ``torch_lightning_indexer`` keeps
    the ``config.index_topk`` best-scoring earlier keys of each query: the mask the attention uses.
    """

    def __init__(self, config: DeepseekV32Config, layer_idx: int) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.index_topk = config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-06)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5

    def forward(
        self,
        hidden_states: torch.Tensor,
        q_latent: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Bool ``[B, 1, S, S]``: the keys each query attends to."""
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        rope_dim = self.qk_rope_head_dim
        q = ops.torch_linear_simple(q_latent, self.wq_b.weight, None, tp_mode="none", layer_type="mla")
        q = ops.view(q, [batch, seq_len, self.n_heads, self.head_dim], layer_type="mla")
        k = ops.torch_linear_simple(hidden_states, self.wk.weight, None, tp_mode="none", layer_type="mla")
        k = ops.view(self.k_norm(k), [batch, seq_len, 1, self.head_dim], layer_type="mla")
        q_rot, q_pass = torch.split(q, [rope_dim, self.head_dim - rope_dim], dim=-1)
        k_rot, k_pass = torch.split(k, [rope_dim, self.head_dim - rope_dim], dim=-1)
        cos, sin = position_embeddings
        q_rot, k_rot = ops.torch_rope_with_explicit_cos_sin(q_rot, k_rot, cos, sin, 2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1)[:, :, 0]
        weights = ops.torch_linear_simple(
            hidden_states.to(self.weights_proj.weight.dtype),
            self.weights_proj.weight,
            None,
            tp_mode="none",
            layer_type="mla",
        )
        weights = weights.float() * self.n_heads**-0.5
        return ops.torch_lightning_indexer(q, k, weights, self.index_topk, self.softmax_scale, True)


class DeepseekV32Attention(nn.Module):
    """Multi-head latent attention over the keys the lightning indexer selects: queries through a
    low-rank q_a/q_b pair; keys and values expanded from the normed KV latent by ``kv_b_proj`` inside
    ``torch_sparse_mla``; one RoPE key part ``k_pe`` shared by all heads.
    """

    def __init__(self, config: DeepseekV32Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
        self.q_a_layernorm = DeepseekV32RMSNorm(self.q_lora_rank, 1e-06)
        self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = DeepseekV32RMSNorm(self.kv_lora_rank, 1e-06)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.v_head_dim, config.hidden_size, bias=config.attention_bias
        )
        self.scaling = self.qk_head_dim**-0.5
        rope_parameters = config.rope_parameters
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_parameters.get("mscale_all_dim"):
            mscale = _yarn_mscale(rope_parameters["factor"], rope_parameters["mscale_all_dim"])
            self.scaling = self.scaling * mscale * mscale
        self.indexer = DeepseekV32Indexer(config, layer_idx)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q_latent = ops.torch_linear_simple(
            hidden_states, self.q_a_proj.weight, self.q_a_proj.bias, tp_mode="none", layer_type="mla"
        )
        q_latent = self.q_a_layernorm(q_latent)
        q = ops.torch_linear_simple(q_latent, self.q_b_proj.weight, None, tp_mode="colwise", layer_type="mla")
        q = ops.view(q, [batch, seq_len, self.num_heads, self.qk_head_dim], tp_scaled_dim=2, layer_type="mla")
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent = ops.torch_linear_simple(
            hidden_states,
            self.kv_a_proj_with_mqa.weight,
            self.kv_a_proj_with_mqa.bias,
            tp_mode="none",
            layer_type="mla",
        )
        compressed_kv, k_pe = torch.split(latent, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        compressed_kv = self.kv_a_layernorm(compressed_kv)
        k_pe = ops.view(k_pe, [batch, seq_len, 1, self.qk_rope_head_dim], layer_type="mla")

        cos, sin = position_embeddings
        # channel pairs (2i, 2i+1) rotate together; q_pe and k_pe leave in one de-interleaved channel
        # order, the same for both, so the scores are unchanged
        q_pe, k_pe = ops.torch_rope_with_qk_interleaving(q_pe, k_pe, cos, sin, 2)
        index_mask = self.indexer(hidden_states, q_latent, position_embeddings)
        attn = ops.torch_sparse_mla(
            q_nope,
            q_pe,
            compressed_kv,
            k_pe,
            self.kv_b_proj.weight,
            index_mask,
            is_causal=True,
            scale=self.scaling,
            layout="bsnd",
            enable_sharding=True,
            layer_type="mla",
        )
        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.v_head_dim], tp_scaled_dim=2, layer_type="mla"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mla"
        )
        return ops.all_reduce(out, layer_type="mla")


class DeepseekV32DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV32Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = DeepseekV32Attention(config, layer_idx)
        self.mlp = (
            DeepseekV32MoE(config)
            if config.mlp_layer_types[layer_idx] == "sparse"
            else DeepseekV32MLP(config)
        )
        self.input_layernorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekV32PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV32Config
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekV32DecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class DeepseekV32Model(DeepseekV32PreTrainedModel):
    def __init__(self, config: DeepseekV32Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DeepseekV32DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = DeepseekV32RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekV32RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        assert position_ids is not None, "position_ids is required"
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        return self.norm(hidden_states)


class DeepseekV32ForCausalLM(DeepseekV32PreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV32Config) -> None:
        super().__init__(config)
        self.model = DeepseekV32Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> DeepseekV32CausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return DeepseekV32CausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("DeepseekV32Config", DeepseekV32ForCausalLM)
