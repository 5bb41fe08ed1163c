"""Measure the lightning indexer of DeepSeek sparse attention (DSA) inside an MLA attention.

DeepSeek-V3.2's and GLM-MoE-DSA's attention hold an indexer: light query heads from the low-rank
query latent, one key per token from the hidden state (LayerNorm'd), one weight per head and query,
and the ``index_topk`` best-scoring keys each query may attend to. The children's roles come from
their shapes; the RoPE layout (half-split or channel pairs) and the scales from running the HF
indexer on random inputs against :func:`onboardlm.ops.sparse_attention.torch_lightning_indexer`
(selections must match exactly); the config fields from rebuilding the indexer on probe configs.
"""

from __future__ import annotations

import ast
import copy
import inspect
import textwrap

import torch
from torch import nn
from transformers import PretrainedConfig

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec_moe import IndexerSpec

__all__ = ["analyze_mla_indexer", "indexer_selection", "rotates_channel_pairs"]

_PROBE_BATCH, _PROBE_TOKENS = 2, 40
_HINT = "a sparse-attention indexer whose parts or scores differ from DeepSeek's lightning indexer"


def analyze_mla_indexer(
    config: PretrainedConfig, model: nn.Module, attn: nn.Module, name: str, path: str
) -> IndexerSpec:
    """The indexer child ``name`` of the MLA attention ``attn`` (at ``path``), or UnsupportedFeature."""
    child = getattr(attn, name)
    where = f"{path}.{name}"
    roles = _roles(config, attn, child, where)
    norm = getattr(child, roles["norm"])
    heads = getattr(child, roles["weights"]).out_features
    head_dim = getattr(child, roles["k"]).out_features
    rope_dim = attn.qk_rope_head_dim
    if getattr(child, roles["q"]).out_features != heads * head_dim or rope_dim > head_dim:
        raise UnsupportedFeature(where, f"indexer query width other than heads x key width: {_HINT}")
    topk = _selected_count(config, model, attn, child, roles, where)
    rope_pairs = _measure_rope_layout(model, attn, child, roles, where)
    return IndexerSpec(
        class_name=type(child).__name__,
        attr=name,
        q_attr=roles["q"],
        k_attr=roles["k"],
        norm_attr=roles["norm"],
        weights_attr=roles["weights"],
        heads_field=_field_moving(config, child, heads, lambda m: getattr(m, roles["weights"]).out_features),
        head_dim_field=_field_moving(config, child, head_dim, lambda m: getattr(m, roles["k"]).out_features),
        topk_field=_topk_field(config, model, attn, child, roles, topk, where),
        norm_eps=repr(float(norm.eps)),
        norm_bias=norm.bias is not None,
        rope_pairs=rope_pairs,
    )


def _roles(config: PretrainedConfig, attn: nn.Module, child: nn.Module, where: str) -> dict[str, str]:
    """Attribute names of the query, key and head-weight projections and of the key norm, by shape."""
    hidden, q_rank = config.hidden_size, getattr(attn, "q_lora_rank", None)
    linears = {n: m for n, m in child.named_children() if isinstance(m, nn.Linear)}
    norms = [n for n, m in child.named_children() if isinstance(m, nn.LayerNorm)]
    others = [n for n, m in child.named_children() if n not in linears and n not in norms]
    from_latent = [n for n, m in linears.items() if m.in_features == q_rank and m.in_features != hidden]
    from_hidden = sorted(
        (n for n, m in linears.items() if m.in_features == hidden), key=lambda n: linears[n].out_features
    )
    if q_rank is None or len(from_latent) != 1 or len(from_hidden) != 2 or len(norms) != 1 or others:
        raise UnsupportedFeature(
            where,
            f"{type(child).__name__}: a sparse-attention indexer other than a low-rank query projection, "
            "a LayerNorm'd key projection and per-head weights (children: "
            f"{', '.join(f'{n}={type(m).__name__}' for n, m in child.named_children())})",
        )
    if any(linears[n].bias is not None for n in (*from_latent, *from_hidden)):
        raise UnsupportedFeature(where, f"indexer projections with a bias: {_HINT}")
    norm = getattr(child, norms[0])
    # the key projection feeds the norm; the other hidden projection gives one weight per head
    k_candidates = [n for n in from_hidden if linears[n].out_features == norm.normalized_shape[-1]]
    if len(k_candidates) != 1 or not norm.elementwise_affine:
        raise UnsupportedFeature(where, f"indexer key norm that does not match one key projection: {_HINT}")
    weights = next(n for n in from_hidden if n != k_candidates[0])
    return {"q": from_latent[0], "k": k_candidates[0], "norm": norms[0], "weights": weights}


def _probe_inputs(model: nn.Module, attn: nn.Module, tokens: int) -> tuple:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(_PROBE_BATCH, tokens, model.config.hidden_size, generator=generator)
    q_resid = torch.randn(_PROBE_BATCH, tokens, attn.q_lora_rank, generator=generator)
    positions = torch.arange(tokens)[None].expand(_PROBE_BATCH, tokens)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if not isinstance(rotary, nn.Module):
        raise UnsupportedFeature(
            type(attn).__name__, "sparse-attention indexer without the model's rotary table"
        )
    cos, sin = rotary(hidden, positions)
    return hidden, q_resid, (cos, sin), positions


def _hf_selection(child: nn.Module, inputs: tuple, where: str) -> torch.Tensor:
    """``[B, 1, S, S]`` bool: the keys the HF indexer selects for each query (causal)."""
    hidden, q_resid, position_embeddings, positions = inputs
    tokens = hidden.shape[1]
    causal = torch.full((tokens, tokens), torch.finfo(torch.float32).min).triu(1)
    mask = causal[None].expand(hidden.shape[0], tokens, tokens)
    try:
        with torch.no_grad():
            indices = child(hidden, q_resid, position_embeddings, mask, positions)
    except (TypeError, RuntimeError, ValueError) as error:
        raise UnsupportedFeature(
            where, f"{type(child).__name__}: a sparse-attention indexer with another call ({error})"
        ) from None
    if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
        raise UnsupportedFeature(
            where, f"{type(child).__name__}: an indexer that does not return top-k indices"
        )
    selected = torch.zeros(hidden.shape[0], tokens, tokens, dtype=torch.bool)
    selected.scatter_(-1, indices.long(), True)
    return (selected & (causal == 0)).unsqueeze(1)


def indexer_selection(
    child: nn.Module, roles: dict[str, str], rope_dim: int, rope_pairs: bool, topk: int, inputs: tuple
) -> torch.Tensor:
    """What the generated indexer computes (the template's forward, here in eager form)."""
    ops = torch.ops.auto_deploy
    hidden, q_resid, (cos, sin), _ = inputs
    batch, tokens = hidden.shape[:2]
    weights_proj = getattr(child, roles["weights"])
    heads, head_dim = weights_proj.out_features, getattr(child, roles["k"]).out_features
    q = getattr(child, roles["q"])(q_resid).view(batch, tokens, heads, head_dim)
    k = getattr(child, roles["norm"])(getattr(child, roles["k"])(hidden)).view(batch, tokens, 1, head_dim)
    q_rot, q_pass = torch.split(q, [rope_dim, head_dim - rope_dim], dim=-1)
    k_rot, k_pass = torch.split(k, [rope_dim, head_dim - rope_dim], dim=-1)
    rope = ops.torch_rope_with_qk_interleaving if rope_pairs else ops.torch_rope_with_explicit_cos_sin
    q_rot, k_rot = rope(q_rot, k_rot, cos, sin, 2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1)[:, :, 0]
    weights = weights_proj(hidden.to(weights_proj.weight.dtype)).float() * heads**-0.5
    with torch.no_grad():
        return ops.torch_lightning_indexer(q, k, weights, topk, head_dim**-0.5, True)


def _selected_count(
    config: PretrainedConfig, model: nn.Module, attn: nn.Module, child: nn.Module, roles: dict, where: str
) -> int:
    """How many keys the HF indexer keeps per query (the widest row over a probe longer than that)."""
    selected = _hf_selection(child, _probe_inputs(model, attn, _PROBE_TOKENS), where)
    count = int(selected.sum(-1).max())
    if count >= _PROBE_TOKENS:
        raise UnsupportedFeature(where, f"indexer keeping {count}+ keys per query: not measurable on a probe")
    return count


def _measure_rope_layout(
    model: nn.Module, attn: nn.Module, child: nn.Module, roles: dict, where: str
) -> bool:
    """True for channel-pair RoPE, False for half-split: the layout whose selection equals the HF one."""
    inputs = _probe_inputs(model, attn, _PROBE_TOKENS)
    expected = _hf_selection(child, inputs, where)
    topk = int(expected.sum(-1).max())
    for pairs in (False, True):
        actual = indexer_selection(child, roles, attn.qk_rope_head_dim, pairs, topk, inputs)
        if torch.equal(actual, expected):
            return pairs
    raise UnsupportedFeature(
        where,
        f"{type(child).__name__}: a sparse-attention indexer whose top-k selection matches neither a "
        "half-split nor an interleaved-RoPE lightning indexer (ReLU'd scaled dots, per-head weights)",
    )


def _int_fields(config: PretrainedConfig, value: int) -> list[str]:
    return [
        name
        for name, v in config.to_dict().items()
        if isinstance(v, int) and not isinstance(v, bool) and v == value and hasattr(config, name)
    ]


def _field_moving(config: PretrainedConfig, child: nn.Module, value: int, measure) -> str:  # noqa: ANN001
    """The config field that sets ``measure(indexer)``: the one whose change rebuilds it with another value."""
    for name in _int_fields(config, value):
        probe = copy.deepcopy(config)
        setattr(probe, name, value * 2)
        try:
            rebuilt = type(child)(probe, 0)
        except Exception:  # noqa: BLE001 - a probe config transformers cannot build is no answer
            continue
        if measure(rebuilt) == value * 2:
            return name
    raise UnsupportedFeature(
        type(child).__name__, f"no config field sets the indexer's width {value}", "set it in config.json"
    )


def _topk_field(
    config: PretrainedConfig,
    model: nn.Module,
    attn: nn.Module,
    child: nn.Module,
    roles: dict,
    topk: int,
    where: str,
) -> str:
    """The config field of the selected-key count: rebuilding the indexer with it changed keeps another count."""
    for name in _int_fields(config, topk):
        probe = copy.deepcopy(config)
        setattr(probe, name, max(1, topk - 1) if topk > 1 else 2)
        try:
            rebuilt = type(child)(probe, 0)
            rebuilt.load_state_dict(child.state_dict())
        except Exception:  # noqa: BLE001 - a probe config transformers cannot build is no answer
            continue
        try:
            if _selected_count(probe, model, attn, rebuilt, roles, where) == getattr(probe, name):
                return name
        except UnsupportedFeature:  # the field also shapes what the indexer is fed (the RoPE width)
            continue
    raise UnsupportedFeature(where, f"no config field sets the indexer's {topk} selected keys per query")


def rotates_channel_pairs(attn: nn.Module) -> bool:
    """Whether every RoPE function the attention's forward calls rotates channel pairs (2i, 2i+1)
    (DeepSeek-V3.2's MLA always does, without a ``rope_interleave`` switch): each module-level function
    it calls with four or more arguments is run on a probe and compared with both layouts."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(type(attn).forward)))
    namespace = vars(inspect.getmodule(type(attn)))
    called = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 4
    }
    functions = [namespace[n] for n in sorted(called) if inspect.isfunction(namespace.get(n))]
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=generator), torch.randn(1, 1, 3, 8, generator=generator)
    freqs = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.03])
    emb = torch.cat([freqs, freqs], dim=-1)[None]
    cos, sin = emb.cos(), emb.sin()
    pairs = torch.ops.auto_deploy.torch_rope_with_qk_interleaving(q, k, cos, sin, 1)
    half = torch.ops.auto_deploy.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 1)
    layouts = []
    for function in functions:
        try:
            out = function(q, k, cos, sin)
        except Exception:  # noqa: BLE001 - not a RoPE function of this signature
            continue
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            continue
        if out[0].shape != q.shape or out[1].shape != k.shape:
            continue
        if all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, pairs, strict=True)):
            layouts.append(True)
        elif all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out, half, strict=True)):
            layouts.append(False)
    return bool(layouts) and all(layouts)
