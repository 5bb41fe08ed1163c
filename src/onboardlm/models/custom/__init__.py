"""Lean model files; importing one registers it with AutoModelForCausalLMFactory."""

from onboardlm.models.custom.modeling_llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
