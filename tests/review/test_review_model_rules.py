"""Model-file rules (B, C, CA, D, H1, A): each passes on the reference files and fails, at the right
line, on a small edit of them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from onboardlm.review import RULES, Status

MLP_RETURN = '        return torch.ops.auto_deploy.all_reduce(down, layer_type="mlp")\n'
NORM_RETURN = (
    "        return torch.ops.auto_deploy.torch_rmsnorm(hidden_states, self.weight, self.variance_epsilon)\n"
)
ATTENTION = '        attn = ops.torch_attention(q, k, v, is_causal=True, scale=self.scaling, layout="bsnd")\n'
ROPE = "        q, k = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 2)\n"
MODEL_ASSERT = (
    '        assert position_ids is not None, "position_ids is required"\n        if inputs_embeds is None:\n'
)
MODEL_EMBED = "        if inputs_embeds is None:\n            inputs_embeds = self.embed_tokens(input_ids)\n"
MODEL_SIGNATURE_END = "        **kwargs,\n    ) -> torch.Tensor:\n"
LAYER_LOOP = "            hidden_states = layer(hidden_states, position_embeddings)\n"
LOGITS = (
    "        logits = torch.ops.auto_deploy.torch_linear_simple(hidden_states, self.lm_head.weight, None)\n"
)
RETURN = "        return LlamaCausalLMOutput(logits=logits.float())\n"
REGISTRATION = 'AutoModelForCausalLMFactory.register_custom_model_cls("LlamaConfig", LlamaForCausalLM)\n'
FACTORY_IMPORT = "from onboardlm.models.factory import AutoModelForCausalLMFactory\n"
MOE_EXPERTS = """        self.experts = nn.ModuleList(
            Qwen3MoeFeedForward(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
"""
MOE_HOOK = "        self.register_load_state_dict_pre_hook(_unpack_experts)\n"
PACKED_EXPERTS = """        self.experts = Qwen3MoePackedExperts(config)
"""
PACKED_CLASS = """class Qwen3MoePackedExperts(nn.Module):
    def __init__(self, config: Qwen3MoeConfig) -> None:
        super().__init__()
        width = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * width, config.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, width))


class Qwen3MoeRoutedBlock(nn.Module):
"""


@dataclass(frozen=True)
class Case:
    """An edit of a reference model file that must fail ``rule`` on the line holding ``marker``."""

    rule: str
    what: str
    replacements: tuple[tuple[str, str], ...]
    marker: str
    source: str = "llama"
    name: str | None = None


CASES = [
    Case("B1", "relative import of another model file", ((FACTORY_IMPORT, FACTORY_IMPORT + "from .modeling_llama import LlamaMLP\n"),), "from .modeling_llama", name="modeling_qwen2.py"),
    Case("B1", "import from the custom-model package", ((FACTORY_IMPORT, FACTORY_IMPORT + "from onboardlm.models.custom import LlamaForCausalLM as Base\n"),), "from onboardlm.models.custom import"),
    Case("B2", "config imported from elsewhere", (("from transformers import LlamaConfig\n", "from my_configs import LlamaConfig\n"),), "from my_configs"),
    Case("B3", "bundled config that transformers has, unregistered", (("from transformers import LlamaConfig\n", "from transformers import PretrainedConfig\n\n\nclass LlamaConfig(PretrainedConfig):\n    model_type = 'llama'\n"),), "class LlamaConfig"),
    Case("C1", "plain-PyTorch RMSNorm", ((NORM_RETURN, "        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)\n        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)\n"),), "torch.rsqrt"),
    Case("C1", "F.scaled_dot_product_attention call", (("import torch\n", "import torch\nimport torch.nn.functional as F\n"), (ATTENTION, "        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)\n")), "F.scaled_dot_product_attention"),
    Case("C1", "plain softmax attention", ((ATTENTION, "        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling\n        attn = torch.matmul(scores.softmax(-1), v)\n"),), "scores = torch.matmul"),
    Case("C1", "plain rotate_half RoPE", ((ROPE, "        half = q.shape[-1] // 2\n        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin\n"),), "torch.cat((-q"),
    Case("C1", "plain nn.Linear call for the lm head", ((LOGITS, "        logits = self.lm_head(hidden_states)\n"),), "self.lm_head(hidden_states)"),
    Case("C1", "transformers' RMSNorm reused", ((FACTORY_IMPORT, FACTORY_IMPORT + "from transformers.models.llama.modeling_llama import LlamaRMSNorm as HFNorm\n"), ("        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)\n", "        self.norm = HFNorm(config.hidden_size, eps=config.rms_norm_eps)\n")), "HFNorm(config"),
    Case("C2", "unknown auto_deploy op", ((ATTENTION, ATTENTION.replace("torch_attention", "torch_fast_attention")),), "ops.torch_fast_attention"),
    Case("C2", "op outside auto_deploy", ((NORM_RETURN, NORM_RETURN.replace("auto_deploy.torch_rmsnorm", "my_kernels.rmsnorm")),), "torch.ops.my_kernels"),
    Case("C3", "backend kernel", ((NORM_RETURN, NORM_RETURN.replace("torch_rmsnorm", "triton_rmsnorm")),), "triton_rmsnorm"),
    Case("C3", ".cuda() call", ((NORM_RETURN, NORM_RETURN.replace("(hidden_states,", "(hidden_states.cuda(),")),), ".cuda()"),
    Case("C4", "use_cache read from kwargs", ((MODEL_EMBED, '        use_cache = kwargs.get("use_cache", False)\n' + MODEL_EMBED),), "use_cache = kwargs"),
    Case("C4", "past_key_values parameter", ((MODEL_SIGNATURE_END, "        past_key_values=None,\n" + MODEL_SIGNATURE_END),), "past_key_values=None"),
    Case("C5", "self.training branch", ((MLP_RETURN, "        if self.training:\n            down = nn.functional.dropout(down, p=0.1)\n" + MLP_RETURN),), "if self.training"),
    Case("C5", "dropout_p taken from the config", ((ATTENTION, ATTENTION.replace("is_causal=True", "dropout_p=self.attention_dropout, is_causal=True")),), "dropout_p=self.attention_dropout"),
    Case("C6", "attn_implementation switch", ((ATTENTION, "        if self.config._attn_implementation == 'sdpa':\n            attn = ops.torch_attention_sdpa(q, k, v, is_causal=True)\n        else:\n" + ATTENTION.replace("        attn", "            attn")),), "_attn_implementation"),
    Case("C7", "causal mask built by hand", ((ATTENTION, "        mask = torch.full((seq_len, seq_len), float('-inf')).triu(1)\n" + ATTENTION.replace("is_causal=True", "attn_mask=mask")),), ".triu(1)"),
    Case("C8", "repeat_kv", ((ATTENTION, "        k, v = repeat_kv(k, 2), repeat_kv(v, 2)\n" + ATTENTION),), "repeat_kv(k"),
    Case("C8", "repeat_interleave", ((ATTENTION, "        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2)\n" + ATTENTION),), "repeat_interleave"),
    Case("C9", "MLP calls its nn.Linear directly", (('        gate = linear(x, self.gate_proj.weight, self.gate_proj.bias, tp_mode="colwise", layer_type="mlp")\n', "        gate = self.gate_proj(x)\n"),), "gate = self.gate_proj(x)"),
    Case("C8", "expand then reshape of K", ((ATTENTION, "        k = k[:, :, :, None].expand(batch, seq_len, self.num_kv_heads, 2, self.head_dim)\n        k = k.reshape(batch, seq_len, -1, self.head_dim)\n" + ATTENTION),), "k = k.reshape"),
    Case("CA1", "position_ids fallback", ((MODEL_ASSERT, "        if position_ids is None:\n            position_ids = torch.arange(input_ids.shape[1])[None]\n        if inputs_embeds is None:\n"),), "if position_ids is None"),
    Case("CA1", "optional position_ids", (("        position_ids: torch.LongTensor,\n", "        position_ids: torch.LongTensor | None = None,\n"),), "    def forward(\n        self,\n        input_ids"),
    Case("CA1", "no **kwargs", ((MODEL_SIGNATURE_END, "    ) -> torch.Tensor:\n"),), "    def forward(\n        self,\n        input_ids"),
    Case("CA2", "output_hidden_states branch", ((LAYER_LOOP, LAYER_LOOP + "        if self.config.output_hidden_states:\n            hidden_states = hidden_states.clone()\n"),), "if self.config.output_hidden_states"),
    Case("CA3", "past_key_values parameter", ((MODEL_SIGNATURE_END, "        past_key_values=None,\n" + MODEL_SIGNATURE_END),), "past_key_values=None"),
    Case("CA3", "attention_mask passed on", ((LAYER_LOOP, "            hidden_states = layer(hidden_states, position_embeddings, attention_mask=None)\n"),), "attention_mask=None"),
    Case("D1", "RoPE buffer without _ad_ prefix", (('"_ad_inv_freq"', '"inv_freq"'), ("self._ad_inv_freq", "self.inv_freq")), 'register_buffer("inv_freq"'),
    Case("D1", "persistent RoPE buffer", (("inv_freq, persistent=False)", "inv_freq)"),), "self.register_buffer("),
    Case("D2", "per-layer position gather", ((LAYER_LOOP, "            hidden_states = layer(hidden_states, self.rotary_emb(inputs_embeds, position_ids))\n"),), "self.rotary_emb(inputs_embeds, position_ids))"),
    Case("D2", "layers receive position_ids", ((LAYER_LOOP, "            hidden_states = layer(hidden_states, position_embeddings, position_ids)\n"), ("position_embeddings: tuple[torch.Tensor, torch.Tensor]\n", "position_embeddings: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor\n")), "position_ids: torch.Tensor\n"),
    Case("A1", "base is not a PreTrainedModel", (("class LlamaPreTrainedModel(PreTrainedModel):", "class LlamaPreTrainedModel(nn.Module):"),), "class LlamaForCausalLM"),
    Case("A2", "tuple returned", ((RETURN, "        return (logits.float(),)\n"),), "return (logits.float(),)"),
    Case("A2", "output class not a dataclass", (("@dataclass\nclass LlamaCausalLMOutput", "class LlamaCausalLMOutput"),), "class LlamaForCausalLM"),
    Case("A3", "logits not cast to float", ((RETURN, "        return LlamaCausalLMOutput(logits=logits)\n"),), "return LlamaCausalLMOutput(logits=logits)"),
    Case("A4", "registration is not the last statement", ((REGISTRATION, REGISTRATION + "print('registered')\n"),), "print('registered')"),
    Case("A4", "registration names another config", ((REGISTRATION, REGISTRATION.replace('"LlamaConfig"', '"MistralConfig"')),), "AutoModelForCausalLMFactory.register"),
    Case("D4", "fused-expert parameter", ((MOE_EXPERTS, PACKED_EXPERTS), ("class Qwen3MoeRoutedBlock(nn.Module):\n", PACKED_CLASS)), "self.experts = Qwen3MoePackedExperts", "moe"),
    Case("D5", "experts are not per-expert modules", ((MOE_EXPERTS, PACKED_EXPERTS), ("class Qwen3MoeRoutedBlock(nn.Module):\n", PACKED_CLASS)), "self.experts = Qwen3MoePackedExperts", "moe"),
    Case("D5", "expert without gate/up/down", ((MOE_EXPERTS, MOE_EXPERTS.replace("Qwen3MoeFeedForward(config, config.moe_intermediate_size)", "Qwen3MoeExpert(config)")), ("class Qwen3MoeRoutedBlock(nn.Module):\n", "class Qwen3MoeExpert(nn.Module):\n    def __init__(self, config: Qwen3MoeConfig) -> None:\n        super().__init__()\n        self.fc_in = nn.Linear(config.hidden_size, 2 * config.moe_intermediate_size, bias=False)\n        self.fc_out = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)\n\n\nclass Qwen3MoeRoutedBlock(nn.Module):\n")), "class Qwen3MoeExpert", "moe"),
    Case("BA2", "fused-expert parameter with no load hook", ((MOE_EXPERTS, PACKED_EXPERTS), ("class Qwen3MoeRoutedBlock(nn.Module):\n", PACKED_CLASS), (MOE_HOOK, "")), "self.gate_up_proj = nn.Parameter", "moe"),
    Case("BA2", "per-expert list with no load hook", ((MOE_HOOK, ""),), "self.experts = nn.ModuleList", "moe"),
    Case("H1", "no converter from packed experts", ((MOE_HOOK, ""),), "self.experts = nn.ModuleList", "moe"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.rule}-{c.what}")
def test_edit_fails_the_rule_at_its_line(case, files, edit, review_rule, lines_failed) -> None:
    edited = edit(getattr(files, case.source), *case.replacements, name=case.name)
    report = review_rule(case.rule, edited.path)
    assert report.result(case.rule).status is Status.FAIL
    assert edited.line_of(case.marker) in lines_failed(report, case.rule), report.result(case.rule).findings


MODEL_RULES = [r.id for r in RULES if not r.needs_tests and r.id not in {"B3", "BA1"}]
MOE_ONLY = {"BA2", "D4", "D5", "H1"}


@pytest.mark.parametrize("rule_id", MODEL_RULES)
def test_reference_files_pass_the_rule(rule_id, files, review_rule) -> None:
    model = files.moe if rule_id in MOE_ONLY else files.llama
    result = review_rule(rule_id, model).result(rule_id)
    assert result.status is Status.PASS, result.findings


def test_every_model_rule_has_a_failing_example() -> None:
    assert {case.rule for case in CASES} >= set(MODEL_RULES)


def test_bundled_config_passes_b3_when_transformers_lacks_it_and_it_is_registered(
    files, edit, review_rule
) -> None:
    bundled = (
        "from transformers import AutoConfig, LlamaConfig, PretrainedConfig\n\n\n"
        "class TinyLlamaLikeConfig(PretrainedConfig):\n    model_type = 'tiny_llama_like'\n\n\n"
        "AutoConfig.register('tiny_llama_like', TinyLlamaLikeConfig, exist_ok=True)\n"
    )
    edited = edit(
        files.llama,
        ("from transformers import LlamaConfig\n", bundled),
        ('register_custom_model_cls("LlamaConfig"', 'register_custom_model_cls("TinyLlamaLikeConfig"'),
        ("config_class = LlamaConfig", "config_class = TinyLlamaLikeConfig"),
    )
    report = review_rule({"B2", "B3"}, edited.path)
    assert report.result("B3").status is Status.PASS
    assert report.result("B2").status is Status.NA

    unregistered = edit(
        files.llama, ("from transformers import LlamaConfig\n", bundled.rsplit("AutoConfig", 1)[0])
    )
    result = review_rule("B3", unregistered.path).result("B3")
    assert result.status is Status.FAIL
    assert "not registered with AutoConfig.register" in result.findings[0].reason


def test_rules_read_code_not_docstrings_or_comments(files, edit, review_rule) -> None:
    noisy = '"""Uses no past_key_values, no self.training, no repeat_kv, no flash attention, no .cuda()."""\n'
    edited = edit(
        files.llama,
        (
            "from dataclasses import dataclass\n",
            noisy + "# triton_kernel?\nfrom dataclasses import dataclass\n",
        ),
    )
    report = review_rule({"C3", "C4", "C5", "C6", "C8"}, edited.path)
    assert report.passed, report.failures


def test_functools_cache_is_not_kv_cache(files, edit, review_rule) -> None:
    edited = edit(
        files.llama,
        (
            "from dataclasses import dataclass\n",
            "from dataclasses import dataclass\nfrom functools import lru_cache\n",
        ),
        (
            "def _rope_inverse_frequencies",
            "@lru_cache\ndef _unused(x: int) -> int:\n    return x\n\n\ndef _rope_inverse_frequencies",
        ),
    )
    assert review_rule("C4", edited.path).passed


def test_dropout_p_zero_is_not_a_training_path(files, edit, review_rule) -> None:
    edited = edit(
        files.llama, (ATTENTION, ATTENTION.replace("is_causal=True", "dropout_p=0.0, is_causal=True"))
    )
    assert review_rule("C5", edited.path).passed


def test_router_buffer_of_a_class_named_like_rope_is_no_rope_table(files, edit, review_rule) -> None:
    """A class named SolarOpenTopkRouter has "rope" inside a word: its buffer is a checkpoint tensor."""
    router = (
        "class SolarOpenTopkRouter(nn.Module):\n    def __init__(self) -> None:\n        super().__init__()\n"
        '        self.register_buffer("e_score_correction_bias", torch.zeros(4))\n\n\n'
    )
    edited = edit(files.llama, ("class LlamaPreTrainedModel(", router + "class LlamaPreTrainedModel("))
    assert review_rule("D1", edited.path).passed


def test_routing_code_may_use_softmax_and_a_plain_gate(files, review_rule) -> None:
    report = review_rule({"C1", "C7"}, files.moe)
    assert report.passed, report.failures


def test_softcapped_float_logits_pass_a3(files, edit, review_rule) -> None:
    softcap = "        logits = torch.tanh(logits.float() / 30.0) * 30.0\n        return LlamaCausalLMOutput(logits=logits)\n"
    assert review_rule("A3", edit(files.llama, (RETURN, softcap)).path).passed


def test_rotary_tables_may_use_a_matmul(files, edit, review_rule) -> None:
    hf_style = "        freqs = (self._ad_inv_freq[None, :, None].float() @ position_ids[:, None, :].float()).transpose(1, 2)\n"
    edited = edit(
        files.llama,
        ("        freqs = position_ids[..., None].float() * self._ad_inv_freq.float()\n", hf_style),
    )
    assert review_rule({"C1", "C7"}, edited.path).passed


def test_a_model_named_flash_is_no_attention_switch(files, edit, review_rule) -> None:
    """C6 reads the model's own name out of its class names (MiMo-V2-Flash's ``MiMoV2Flash*``) and
    still flags a flash switch in such a file."""
    renamed = edit(files.llama, *((name, f"MiMoV2Flash{name[5:]}") for name in _llama_class_names(files)))
    assert review_rule("C6", renamed.path).passed
    switched = edit(
        renamed.path,
        (ATTENTION, "        use_flash_attn = False\n" + ATTENTION),
    )
    report = review_rule("C6", switched.path)
    assert not report.passed and "use_flash_attn" in report.result("C6").findings[0].reason


def _llama_class_names(files) -> list[str]:
    """The ``Llama*`` class names the golden file defines, longest first (so none is a prefix of a
    later one's replacement)."""
    import ast

    tree = ast.parse(files.llama.read_text(encoding="utf-8"))
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    names |= {"LlamaConfig"}
    return sorted((n for n in names if n.startswith("Llama")), key=len, reverse=True)
