"""Lean, export-friendly Jamba on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.jamba.modeling_jamba`` (JambaForCausalLM): a hybrid stack of pre-norm
layers with RMSNorm, built from Mamba1 selective-scan mixers, mixture-of-experts feed-forward,
grouped-query attention, dense MLPs. Layer kinds in the analyzed config: mamba1+moe (1 of 2 layers),
attention+mlp (1 of 2 layers); a layer's kind is read from config.layer_types[layer_idx]. Module
names equal the checkpoint keys, so HuggingFace state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions), attention masks
and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel
paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import JambaConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


@dataclass
class JambaCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class JambaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class JambaMambaMixer(nn.Module):
    """Mamba1 selective-scan mixer: in_proj -> causal depthwise conv on x -> x_proj (dt, B, C) -> dt_proj
    -> selective scan -> SiLU gate -> out_proj. The scan state is [channels, state] with its own decay
    per entry; it runs on ``torch_ssm`` as one head of width 1 per (state entry, channel) pair, state
    entry major, so head ``n * channels + c`` reads B/C group ``n`` (one state entry): B and C go in
    whole, and a rank holding some channels keeps every group. The skip ``D x`` is the scan's own, on
    state entry 0 of each channel, and the output sums a channel's heads. The conv and the scan run from
    a zero state here; the runtime's cache transform swaps in their cached versions."""

    chunk_size = 32  # SSD chunk length of the scan (exact for any length; bounds its memory)

    def __init__(self, config: JambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.intermediate_size = int(config.mamba_expand * config.hidden_size)
        self.ssm_state_size = config.mamba_d_state
        self.time_step_rank = config.mamba_dt_rank
        self.conv_kernel_size = config.mamba_d_conv
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.intermediate_size, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size,
            self.intermediate_size,
            kernel_size=self.conv_kernel_size,
            groups=self.intermediate_size,
            padding=self.conv_kernel_size - 1,
            bias=config.mamba_conv_bias,
        )
        self.act = ACT2FN[config.hidden_act]
        self.x_proj = nn.Linear(
            self.intermediate_size, self.time_step_rank + 2 * self.ssm_state_size, bias=False
        )
        self.dt_proj = nn.Linear(self.time_step_rank, self.intermediate_size, bias=True)
        self.dt_layernorm = JambaRMSNorm(self.time_step_rank, config.rms_norm_eps)
        self.b_layernorm = JambaRMSNorm(self.ssm_state_size, config.rms_norm_eps)
        self.c_layernorm = JambaRMSNorm(self.ssm_state_size, config.rms_norm_eps)
        self.A_log = nn.Parameter(torch.zeros(self.intermediate_size, self.ssm_state_size))
        self.D = nn.Parameter(torch.ones(self.intermediate_size))
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mamba_proj_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, state = self.intermediate_size, self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner],
            layer_type="ssm",
        )
        x, gate = ops.split_with_sizes(
            projected, [inner, inner], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.torch_causal_conv1d(
            x,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=inner,
            shardable=True,
            layer_type="ssm",
        )
        x = self.act(x)
        ssm_parameters = ops.torch_linear_simple(
            x, self.x_proj.weight, None, tp_mode="rowwise", layer_type="ssm"
        )
        ssm_parameters = ops.all_reduce(ssm_parameters, layer_type="ssm")
        dt, B, C = torch.split(ssm_parameters, [self.time_step_rank, state, state], dim=-1)
        dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = ops.torch_linear_simple(dt, self.dt_proj.weight, None, tp_mode="colwise", layer_type="ssm")
        # heads [state entry, channel] flattened; x, dt and the per-channel parameters broadcast over
        # the state entries (-1 keeps the rank's own channel count)
        heads = [batch, seq_len, state * inner]
        y = ops.torch_ssm(
            ops.view(
                x[:, :, None, :].expand(-1, -1, state, -1), [*heads, 1], tp_scaled_dim=2, layer_type="ssm"
            ),
            -torch.exp(self.A_log.float()).t().flatten(),
            B[..., None],
            C[..., None],
            F.pad(self.D[None, :], (0, 0, 0, state - 1)).flatten(),
            ops.view(dt[:, :, None, :].expand(-1, -1, state, -1), heads, tp_scaled_dim=2, layer_type="ssm"),
            self.dt_proj.bias[None, :].expand(state, -1).flatten(),
            [0.0, float("inf")],
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, state, inner], tp_scaled_dim=3, layer_type="ssm").sum(2)
        y = y * F.silu(gate.float())
        out = ops.torch_linear_simple(
            y.to(hidden_states.dtype),
            self.out_proj.weight,
            self.out_proj.bias,
            tp_mode="rowwise",
            layer_type="ssm",
        )
        return ops.all_reduce(out, layer_type="ssm")


def _store_expert_tensors(
    state_dict: dict[str, torch.Tensor], prefix: str, name: str, stacked: torch.Tensor
) -> None:
    """Split ``stacked`` along its first (expert) dim into ``<prefix><e>.<name>`` entries."""
    state_dict.update({f"{prefix}{index}.{name}": tensor for index, tensor in enumerate(stacked.unbind(0))})


class JambaExpert(nn.Module):
    """One routed expert's weights; JambaSparseMoeBlock runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class JambaTopKRouter(nn.Module):
    """Softmax over all experts, then each token's top-k."""

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and fp32 routing weights, both ``[T, top_k]``, for tokens ``[T, H]``."""
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        weights, selected = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        return selected, weights


class JambaSparseMoeBlock(nn.Module):
    """Mixture of experts behind a softmax top-k router.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.router = JambaTopKRouter(config)
        self.experts = nn.ModuleList(
            JambaExpert(config.hidden_size, config.intermediate_size) for _ in range(config.num_local_experts)
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
        selected_experts, routing_weights = self.router(tokens)
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
        return out.reshape(hidden_states.shape)


class JambaAttention(nn.Module):
    def __init__(self, config: JambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len = hidden_states.shape[:2]
        q = ops.torch_linear_simple(
            hidden_states, self.q_proj.weight, self.q_proj.bias, tp_mode="colwise", layer_type="mha"
        )
        k = ops.torch_linear_simple(
            hidden_states,
            self.k_proj.weight,
            self.k_proj.bias,
            tp_mode="colwise",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        v = ops.torch_linear_simple(
            hidden_states,
            self.v_proj.weight,
            self.v_proj.bias,
            tp_mode="colwise",
            tp_min_local_shape=self.head_dim,
            layer_type="mha",
        )
        q = ops.view(q, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        k = ops.view(k, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        v = ops.view(v, [batch, seq_len, self.num_kv_heads, self.head_dim], tp_scaled_dim=2, layer_type="mha")
        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")

        attn = ops.view(
            attn, [batch, seq_len, self.num_heads * self.head_dim], tp_scaled_dim=2, layer_type="mha"
        )
        out = ops.torch_linear_simple(
            attn, self.o_proj.weight, self.o_proj.bias, tp_mode="rowwise", layer_type="mha"
        )
        return ops.all_reduce(out, layer_type="mha")


class JambaMLP(nn.Module):
    def __init__(self, config: JambaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")
        up = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(gate) * up,
            self.down_proj.weight,
            self.down_proj.bias,
            tp_mode="rowwise",
            layer_type="mlp",
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class JambaMambaDecoderLayer(nn.Module):
    def __init__(self, config: JambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = JambaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mamba = JambaMambaMixer(config, layer_idx)
        self.pre_ff_layernorm = JambaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = (
            JambaSparseMoeBlock(config)
            if (config.layers_num_experts[layer_idx] if config.layers_num_experts else 1) > 1
            else JambaMLP(config)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mamba(self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.feed_forward(self.pre_ff_layernorm(hidden_states))
        return hidden_states


class JambaAttentionDecoderLayer(nn.Module):
    def __init__(self, config: JambaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = JambaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = JambaAttention(config, layer_idx)
        self.pre_ff_layernorm = JambaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = (
            JambaSparseMoeBlock(config)
            if (config.layers_num_experts[layer_idx] if config.layers_num_experts else 1) > 1
            else JambaMLP(config)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        hidden_states = hidden_states + self.feed_forward(self.pre_ff_layernorm(hidden_states))
        return hidden_states


class JambaPreTrainedModel(PreTrainedModel):
    config_class = JambaConfig
    base_model_prefix = "model"
    _no_split_modules = ["JambaMambaDecoderLayer"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class JambaModel(JambaPreTrainedModel):
    def __init__(self, config: JambaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            (
                JambaMambaDecoderLayer
                if config.layer_types[i] in ("linear_attention",)
                else JambaAttentionDecoderLayer
            )(config, i)
            for i in range(config.num_hidden_layers)
        )
        self.final_layernorm = JambaRMSNorm(config.hidden_size, config.rms_norm_eps)
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
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.final_layernorm(hidden_states)


class JambaForCausalLM(JambaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JambaConfig) -> None:
        super().__init__(config)
        self.model = JambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> JambaCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return JambaCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("JambaConfig", JambaForCausalLM)
