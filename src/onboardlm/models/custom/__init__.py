"""Lean model files; importing one registers it with AutoModelForCausalLMFactory.

A model whose config class the installed transformers lacks is skipped (logged at debug level).
"""

import importlib
import logging

MODEL_MODULES = [
    "modeling_afmoe",
    "modeling_apertus",
    "modeling_aria_text",
    "modeling_axk1",
    "modeling_bamba",
    "modeling_biogpt",
    "modeling_bitnet",
    "modeling_bloom",
    "modeling_codegen",
    "modeling_cohere",
    "modeling_cohere2_moe",
    "modeling_cohere_compass_text",
    "modeling_ctrl",
    "modeling_deepseek_v2",
    "modeling_deepseek_v3",
    "modeling_diffllama",
    "modeling_ernie4_5_moe",
    "modeling_falcon",
    "modeling_falcon_mamba",
    "modeling_gemma",
    "modeling_gemma2",
    "modeling_gemma3_text",
    "modeling_glm4_moe",
    "modeling_glm4_moe_lite",
    "modeling_gpt2",
    "modeling_gpt_bigcode",
    "modeling_gpt_neo",
    "modeling_gpt_neox",
    "modeling_gpt_neox_japanese",
    "modeling_gpt_oss",
    "modeling_gptj",
    "modeling_granite",
    "modeling_granite_swa",
    "modeling_hunyuan_v1_dense",
    "modeling_hunyuan_v1_moe",
    "modeling_internlm3",
    "modeling_lara_mini",
    "modeling_llama",
    "modeling_mamba2",
    "modeling_minicpm3",
    "modeling_minimax_m2",
    "modeling_minimax_m3_vl_text",
    "modeling_ministral3",
    "modeling_mistral",
    "modeling_mixtral",
    "modeling_modernbert_decoder",
    "modeling_mpt",
    "modeling_nanochat",
    "modeling_olmo2",
    "modeling_openai_gpt",
    "modeling_opt",
    "modeling_persimmon",
    "modeling_phi",
    "modeling_phi3",
    "modeling_phimoe",
    "modeling_qwen2",
    "modeling_qwen2_moe",
    "modeling_qwen3",
    "modeling_qwen3_5_text",
    "modeling_qwen3_moe",
    "modeling_qwen3_next",
    "modeling_smollm3",
    "modeling_stablelm",
    "modeling_starcoder2",
    "modeling_xglm",
]

for _name in MODEL_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ImportError as _err:
        logging.getLogger(__name__).debug("skipped %s: %s", _name, _err)
