"""GraphModule -> GraphModule passes applied to an exported lean model before it runs."""

from onboardlm.transforms.gather_logits import LOGIT_INDEX, insert_logit_gather
from onboardlm.transforms.kv_cache import INPUT_POS, KV_LEN, CachedGraph, CacheSpec, insert_cached_attention

__all__ = [
    "INPUT_POS",
    "KV_LEN",
    "LOGIT_INDEX",
    "CacheSpec",
    "CachedGraph",
    "insert_cached_attention",
    "insert_logit_gather",
]
