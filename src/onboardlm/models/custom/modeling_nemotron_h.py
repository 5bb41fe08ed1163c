"""Lean, export-friendly NemotronH on canonical ``auto_deploy`` ops.

Mirrors ``transformers.models.nemotron_h.modeling_nemotron_h`` (NemotronHForCausalLM): a hybrid
stack of pre-norm layers with RMSNorm, built from Mamba2 SSD mixers, mixture-of-experts
feed-forward, grouped-query attention, dense MLPs. Layer kinds in the analyzed config: mamba2 (1 of
4 layers), moe (1 of 4 layers), attention (1 of 4 layers), mlp (1 of 4 layers); a layer's kind is
read from config.layer_types[layer_idx]. Module names equal the checkpoint keys, so HuggingFace
state dicts load with ``strict=True``.

Left out on purpose: the KV cache and the mixers' conv and scan states (they run from a zero state
on ``torch_causal_conv1d`` / ``torch_ssm``; the runtime swaps in cached versions), attention masks
and padding masks (sequences are causal and unpadded), dropout, gradient checkpointing, fused-kernel
paths, position-id generation (callers pass them), hidden-state outputs and the loss.
Linear, split, view, conv, scan and gated-norm calls carry tensor-parallel sharding hints; they do
not change the numbers.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import NemotronHConfig
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.models.factory import AutoModelForCausalLMFactory
from onboardlm.ops import ActivationType


@dataclass
class NemotronHCausalLMOutput(ModelOutput):
    logits: torch.FloatTensor | None = None


class NemotronHRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)


class NemotronHRMSNormGated(nn.Module):
    """Grouped RMSNorm of the SSM output, gated by SiLU(gate) before the norm."""

    def __init__(self, hidden_size: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return torch.ops.auto_deploy.torch_rmsnorm_gated(
            hidden_states,
            self.weight,
            gate,
            self.variance_epsilon,
            self.group_size,
            norm_before_gate=False,
            tp_mode="colwise",
            layer_type="ssm",
        )


class NemotronHMamba2Mixer(nn.Module):
    """Mamba2 (SSD) mixer: in_proj -> causal depthwise conv on x|B|C -> selective scan -> gated RMSNorm
    -> out_proj. The conv and the scan run from a zero state here; the runtime's cache transform swaps
    in their cached versions (conv and SSM state per sequence)."""

    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.mamba_num_heads
        self.n_groups = config.n_groups
        self.ssm_state_size = config.ssm_state_size
        self.intermediate_size = config.mamba_num_heads * config.mamba_head_dim
        self.head_dim = self.intermediate_size // self.num_heads
        self.conv_kernel_size = config.conv_kernel
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.chunk_size = config.chunk_size
        self.time_step_limit = [float(value) for value in config.time_step_limit]
        self.in_proj = nn.Linear(
            config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=self.conv_kernel_size,
            groups=self.conv_dim,
            padding=self.conv_kernel_size - 1,
            bias=config.use_conv_bias,
        )
        self.act = ACT2FN[config.mamba_hidden_act]
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = NemotronHRMSNormGated(
            self.intermediate_size, self.intermediate_size // self.n_groups, config.layer_norm_epsilon
        )
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.auto_deploy
        batch, seq_len, _ = hidden_states.shape
        inner, group_state = self.intermediate_size, self.n_groups * self.ssm_state_size
        projected = ops.torch_linear_simple(
            hidden_states,
            self.in_proj.weight,
            self.in_proj.bias,
            tp_mode="colwise",
            output_sizes=[inner, inner, group_state, group_state, self.num_heads],
            layer_type="ssm",
        )
        gate, xbc, dt = ops.split_with_sizes(
            projected, [inner, self.conv_dim, self.num_heads], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        xbc = ops.torch_causal_conv1d(
            xbc,
            self.conv1d.weight,
            self.conv1d.bias,
            padding=self.conv_kernel_size - 1,
            groups=self.conv_dim,
            shardable=True,
            output_sizes=[inner, group_state, group_state],
            layer_type="ssm",
        )
        xbc = self.act(xbc)
        x, B, C = ops.split_with_sizes(
            xbc, [inner, group_state, group_state], dim=-1, enable_sharding=True, layer_type="ssm"
        )
        x = ops.view(x, [batch, seq_len, self.num_heads, self.head_dim], tp_scaled_dim=2, layer_type="ssm")
        B = ops.view(
            B, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        C = ops.view(
            C, [batch, seq_len, self.n_groups, self.ssm_state_size], tp_scaled_dim=2, layer_type="ssm"
        )
        y = ops.torch_ssm(
            x,
            -torch.exp(self.A_log.float()),
            B,
            C,
            self.D,
            dt,
            self.dt_bias,
            self.time_step_limit,
            self.chunk_size,
            shardable=True,
            layer_type="ssm",
        )
        y = ops.view(y, [batch, seq_len, inner], tp_scaled_dim=2, layer_type="ssm")
        y = self.norm(y, gate)
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


class NemotronHMLP(nn.Module):
    """Non-gated MLP ``down(act(up(x)))`` of a shared expert or a dense layer (``intermediate_size``
    defaults to the config's)."""

    def __init__(self, config: NemotronHConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = config.intermediate_size if intermediate_size is None else intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.mlp_hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = torch.ops.auto_deploy.torch_linear_simple
        up = linear(x, self.up_proj.weight, self.up_proj.bias, tp_mode="colwise", layer_type="mlp")
        down = linear(
            self.act_fn(up), self.down_proj.weight, self.down_proj.bias, tp_mode="rowwise", layer_type="mlp"
        )
        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")


class NemotronHExpert(nn.Module):
    """One routed expert's weights; NemotronHMoE runs all experts at once through torch_moe."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)


class NemotronHTopkRouter(nn.Module):
    """Sigmoid scores; the top-k are chosen on score + ``e_score_correction_bias`` among the experts of
    the ``topk_group`` best of ``n_group`` groups (a group scores the sum of its two best experts).
    The chosen sigmoid scores (renormalised when norm_topk_prob) times ``routed_scaling_factor``
    are the routing weights. Computed in fp32.
    """

    def __init__(self, config: NemotronHConfig) -> None:
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


class NemotronHMoE(nn.Module):
    """Mixture of experts behind a sigmoid router with bias-corrected grouped top-k,
    plus the always-on `shared_experts`.

    The routed experts run in torch_moe;
    a load hook unpacks HF's packed expert tensors.
    """

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.gate = NemotronHTopkRouter(config)
        self.experts = nn.ModuleList(
            NemotronHExpert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_local_experts)
        )
        self.shared_experts = NemotronHMLP(
            config, intermediate_size=config.moe_shared_expert_intermediate_size
        )
        self._register_load_state_dict_pre_hook(self._unpack_packed_experts)

    def _unpack_packed_experts(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: HF's packed non-gated ``experts.up_proj`` [E, I, H] and ``experts.down_proj``
        [E, H, I] become per-expert ``experts.<e>.{up,down}_proj`` keys (``gate_up`` holds the up rows).
        Per-expert checkpoints load unchanged.
        """
        experts = f"{prefix}experts."
        gate_up = state_dict.pop(f"{experts}up_proj", None)
        if gate_up is not None:
            _store_expert_tensors(state_dict, experts, "up_proj.weight", gate_up)
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
            w1_weight=[expert.up_proj.weight for expert in self.experts],
            w2_weight=[expert.down_proj.weight for expert in self.experts],
            w3_weight=[],
            is_gated_mlp=False,
            act_fn=ActivationType.Relu2,
            layer_type="moe",
        )
        out = torch.ops.auto_deploy.all_reduce(out, layer_type="moe")
        shared = self.shared_experts(tokens)
        out = out + shared
        return out.reshape(hidden_states.shape)


class NemotronHAttention(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
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


class NemotronHBlock(nn.Module):
    def __init__(self, config: NemotronHConfig, layer_idx: int) -> None:
        super().__init__()
        self.block_type = config.layer_types[layer_idx]
        self.norm = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)
        if self.block_type == "linear_attention":  # mamba2 layers
            self.mixer = NemotronHMamba2Mixer(config, layer_idx)
        elif self.block_type == "moe":  # moe layers
            self.mixer = NemotronHMoE(config)
        elif self.block_type == "full_attention":  # attention layers
            self.mixer = NemotronHAttention(config, layer_idx)
        elif self.block_type == "mlp":  # mlp layers
            self.mixer = NemotronHMLP(config)
        else:
            raise ValueError(
                f"layer {layer_idx}: block type {self.block_type!r} is none of 'linear_attention', 'moe', 'full_attention', 'mlp'"
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.norm(hidden_states))
        return hidden_states


class NemotronHPreTrainedModel(PreTrainedModel):
    config_class = NemotronHConfig
    base_model_prefix = "model"
    _no_split_modules = ["NemotronHBlock"]

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        """The experts run in ``torch_moe``: transformers' experts kernels never apply."""
        return "eager"


class NemotronHModel(NemotronHPreTrainedModel):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(NemotronHBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = NemotronHRMSNorm(config.hidden_size, config.layer_norm_epsilon)
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
            inputs_embeds = self.embeddings(input_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm_f(hidden_states)


class NemotronHForCausalLM(NemotronHPreTrainedModel):
    _tied_weights_keys = {}  # as transformers' class: the head is never tied to the embeddings

    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__(config)
        self.model = NemotronHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> NemotronHCausalLMOutput:
        assert position_ids is not None, "position_ids is required"
        hidden_states = self.model(input_ids, position_ids, inputs_embeds)
        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)
        return NemotronHCausalLMOutput(logits=logits.float())


AutoModelForCausalLMFactory.register_custom_model_cls("NemotronHConfig", NemotronHForCausalLM)
