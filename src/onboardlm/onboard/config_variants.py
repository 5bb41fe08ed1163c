"""Config variants that take the branches of a lean model file that the base test config does not.

The tiny test config is one point of the family's config space; a lean file keeps branches for
others: flags real checkpoints set the other way (``norm_topk_prob``, ``attention_bias``), optional
ranks that switch a projection on or off (``q_lora_rank``), tied and untied embeddings, and RoPE
scaling (a default table vs yarn, with DeepSeek's softmax ``mscale``). Each candidate flips one of
them; it is kept when transformers builds and runs the model with it. A flip that transformers
ignores is kept too: the lean file reads the flag, so the test shows whether it ignores it as well.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig

from onboardlm.onboard.analyze_moe import predict_layers

__all__ = ["Variant", "candidate_variants", "config_variants"]

#: Yarn for the RoPE variant: a factor that changes the low frequencies and the cos/sin scale.
YARN_FACTOR = 4.0


@dataclass(frozen=True)
class Variant:
    """One test id and the config fields it overrides."""

    label: str
    overrides: dict[str, Any]
    group: str = ""  # "rope": only the first that runs is kept; "flag": one config flag flipped


def _config_reads(tree: ast.Module) -> set[str]:
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "config"
    }


def _refused_settings(tree: ast.Module) -> set[tuple[str, bool]]:
    """(field, value) pairs the file's docstring says it is not for ("not for configs with
    config.alibi=True, ..."): flags whose other value builds modules this file does not have."""
    docstring = " ".join((ast.get_docstring(tree) or "").split())
    sentence = re.search(r"not for configs with (.*?) \(measured", docstring)
    if sentence is None:
        return set()
    return {(name, value == "True") for name, value in re.findall(r"config\.(\w+)=(True|False)", sentence[1])}


def _optional_fields(tree: ast.Module) -> set[str]:
    """Fields copied as ``self.x = config.x`` and tested with ``self.x is None``, or tested as
    ``config.x is None`` (Falcon-H1's ``mamba_d_ssm``, whose None means a width derived otherwise)."""
    copied = {
        node.targets[0].attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "config"
        and node.targets[0].attr == node.value.attr
    }
    tested = {
        node.left.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Attribute)
        and isinstance(node.ops[0], (ast.Is, ast.IsNot))
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value is None
    }
    direct = {
        node.left.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and isinstance(node.left, ast.Attribute)
        and isinstance(node.left.value, ast.Name)
        and node.left.value.id == "config"
        and isinstance(node.ops[0], (ast.Is, ast.IsNot))
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value is None
    }
    return (copied & tested) | direct


def _has_rope_branch(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.Compare)
        and isinstance(node.comparators[0], ast.Constant)
        and node.comparators[0].value == "default"
        for node in ast.walk(tree)
    )


def _other_rope(parameters: dict[str, Any], scaled: dict[str, Any]) -> dict[str, Any]:
    """The default table for any scaled one, else ``scaled`` (``rope_theta`` and a partial rotary
    factor kept); per layer type, each table likewise."""
    if "rope_theta" not in parameters:  # per layer type: one table per key (None: no RoPE)
        return {key: value and _other_rope(value, scaled) for key, value in parameters.items()}
    kept = {k: v for k, v in parameters.items() if k in ("rope_theta", "partial_rotary_factor")}
    if parameters.get("rope_type", "default") != "default":
        return {**kept, "rope_type": "default"}
    return {**kept, **scaled}


def _scaled_ropes(max_positions: int, mscale: bool) -> list[dict[str, Any]]:
    """Scaled RoPE parameters to try, in order: yarn (frequencies and the cos/sin scale; DeepSeek's
    softmax mscale too where the file reads it), then linear (for families without yarn support)."""
    yarn: dict[str, Any] = {
        "rope_type": "yarn",
        "factor": YARN_FACTOR,
        "original_max_position_embeddings": max(1, int(max_positions // YARN_FACTOR)),
    }
    if mscale:
        yarn.update(mscale=1.0, mscale_all_dim=1.0)
    return [yarn, {"rope_type": "linear", "factor": YARN_FACTOR}]


def _per_layer_float_variants(name: str, value: Any, num_layers: int) -> list[Variant]:
    """A float per layer (Granite-SWA's RoPE base per layer, 0 for none) that the test config sets
    alike on every layer: a 0 on the first layer, and a distinct value on each layer."""
    if (
        not isinstance(value, list)
        or len(value) != num_layers
        or num_layers < 2
        or not all(isinstance(v, float) for v in value)
        or len(set(value)) > 1
    ):
        return []
    unit = max(abs(v) for v in value) or 1.0
    return [
        Variant(f"{name}[0]=0", {name: [0.0] + [unit * (i + 1) for i in range(1, num_layers)]}),
        Variant(f"{name}=distinct", {name: [unit * (i + 1) for i in range(num_layers)]}),
    ]


def candidate_variants(tiny: PretrainedConfig, lean_source: str | None) -> list[Variant]:
    """One flip per branch the lean file may have, before checking that transformers runs it."""
    tree = ast.parse(lean_source) if lean_source is not None else None
    found = []
    if tree is not None:
        refused = _refused_settings(tree)
        reads = sorted(_config_reads(tree))
        for name in reads:
            value = getattr(tiny, name, None)
            if isinstance(value, bool) and name != "tie_word_embeddings" and (name, not value) not in refused:
                found.append(Variant(f"{name}={not value}", {name: not value}, group="flag"))
        for name in sorted(_optional_fields(tree)):
            if getattr(tiny, name, None) is not None:
                found.append(Variant(f"{name}=None", {name: None}))
        found += _position_scale_variants(tiny, tree)
        found += _key_window_variants(tiny, tree)
        found += _layer_list_variants(tiny, tree)
        for name in reads:
            found += _per_layer_float_variants(name, getattr(tiny, name, None), tiny.num_hidden_layers)
        found += _layer_rule_variants(tiny, tree)
        found += _multiplier_variants(tiny, reads)
        found += _width_switch_variants(tiny, tree)
    tied = bool(getattr(tiny, "tie_word_embeddings", False))
    found.append(Variant(f"tie_word_embeddings={not tied}", {"tie_word_embeddings": not tied}))
    parameters = getattr(tiny, "rope_parameters", None)
    if isinstance(parameters, dict) and parameters and (tree is None or _has_rope_branch(tree)):
        mscale = lean_source is not None and "mscale_all_dim" in lean_source
        max_positions = int(getattr(tiny, "max_position_embeddings", 4096) or 4096)
        for scaled in _scaled_ropes(max_positions, mscale):
            other = _other_rope(parameters, scaled)
            tables = [other] if "rope_theta" in other else [table for table in other.values() if table]
            kinds = "/".join(sorted({table.get("rope_type", "default") for table in tables}))
            found.append(Variant(f"rope={kinds}", {"rope_parameters": other}, group="rope"))
    return found


#: Distinct values for the scalar multipliers of ``_multiplier_variants`` (one per field, in order).
TELLING_MULTIPLIERS = (0.7, 1.3, 0.55, 1.45, 0.8, 1.2, 0.65, 1.35)


def _multiplier_variants(tiny: PretrainedConfig, reads: list[str]) -> list[Variant]:
    """The float ``*_multiplier`` fields the lean file reads that the test config leaves at 1 (where a
    dropped or swapped multiplier changes nothing): one variant sets each to a distinct value
    (Granite's ``residual_multiplier`` on the hybrid steps, Falcon-H1's attention / SSM multipliers)."""
    names = [
        name
        for name in reads
        if "multiplier" in name
        and not any(part in name for part in ("dim", "size"))  # a width factor, not a scalar
        and isinstance(getattr(tiny, name, None), float)
        and getattr(tiny, name) == 1.0
    ]
    lists = [
        name
        for name in reads
        if "multipliers" in name
        and isinstance(getattr(tiny, name, None), (list, tuple))
        and all(isinstance(v, float) and v == 1.0 for v in getattr(tiny, name))
    ]
    found = [Variant("multipliers", dict(zip(names, TELLING_MULTIPLIERS, strict=False)))] if names else []
    for name in lists:  # one distinct value per entry (Falcon-H1's ssm_multipliers on in_proj's segments)
        size = len(getattr(tiny, name))
        found.append(Variant(f"{name}=distinct", {name: list(TELLING_MULTIPLIERS[:size])}))
    return found


#: Period of the q scale by position in its variant: the test's positions cross several periods.
SHORT_PERIOD = 2


def _position_scale_variants(tiny: PretrainedConfig, tree: ast.Module) -> list[Variant]:
    """A short period for a q scale by position (``self.position_scale_period = config...``: Ministral3
    divides positions by ``rope_parameters["original_max_position_embeddings"]``), so that the test's
    few positions take the scale's branch (at the tiny config's period it is 1 on all of them)."""
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Assign)
            and [ast.unparse(t) for t in node.targets] == ["self.position_scale_period"]
        ):
            continue
        value = node.value
        parameters = getattr(tiny, "rope_parameters", None)
        if (
            isinstance(value, ast.Subscript)
            and ast.unparse(value.value) == "config.rope_parameters"
            and isinstance(value.slice, ast.Constant)
            and isinstance(parameters, dict)
        ):
            overrides = {"rope_parameters": {**parameters, value.slice.value: SHORT_PERIOD}}
        elif isinstance(value, ast.Attribute) and ast.unparse(value.value) == "config":
            overrides = {value.attr: SHORT_PERIOD}
        else:
            continue
        found.append(Variant(f"position_scale_period={SHORT_PERIOD}", overrides))
    return found


#: Keys a query row keeps in the key-window variant: fewer than the test's sequence length.
SHORT_KEY_WINDOW = 3


def _key_window_variants(tiny: PretrainedConfig, tree: ast.Module) -> list[Variant]:
    """A short window of highest-bias keys (``self.keep_window = config.<field>``: Doge's
    ``keep_window_size``), so that the test's rows hold more keys than it keeps and drop some."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and [ast.unparse(t) for t in node.targets] == ["self.keep_window"]
            and isinstance(node.value, ast.Attribute)
            and ast.unparse(node.value.value) == "config"
            and isinstance(getattr(tiny, node.value.attr, None), int)
        ):
            found.append(
                Variant(f"{node.value.attr}={SHORT_KEY_WINDOW}", {node.value.attr: SHORT_KEY_WINDOW})
            )
    return found


def _layer_list_variants(tiny: PretrainedConfig, tree: ast.Module) -> list[Variant]:
    """A list of layer indices the file tests ``layer_idx in config.<name>`` against (Llama 4's
    ``moe_layers``) that names every layer of the test config: layer 0 left out, so that the branch
    for the layers not listed (dense MLP layers) runs too."""
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Name)
            and node.left.id == "layer_idx"
            and isinstance(node.ops[0], ast.In)
            and isinstance(node.comparators[0], ast.Attribute)
            and ast.unparse(node.comparators[0].value) == "config"
        ):
            continue
        name = node.comparators[0].attr
        value = getattr(tiny, name, None)
        if isinstance(value, list) and 0 in value and len(value) > 1:
            found.append(Variant(f"{name}=without_0", {name: [i for i in value if i != 0]}))
    return found


def _layer_rules(tree: ast.Module) -> list[str]:
    """Tests of ``Block(config) if <test> else Other(config)`` constructors that read ``layer_idx``
    (Jamba's MoE placement by ``expert_layer_period`` / ``_offset`` in layers of every kind)."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.IfExp)
            and isinstance(node.body, ast.Call)
            and isinstance(node.orelse, ast.Call)
            and any(isinstance(n, ast.Name) and n.id == "layer_idx" for n in ast.walk(node.test))
            and any(isinstance(n, ast.Name) and n.id == "config" for n in ast.walk(node.test))
        ):
            found.append(ast.unparse(node.test))
    return list(dict.fromkeys(found))


def _layer_rule_variants(tiny: PretrainedConfig, tree: ast.Module) -> list[Variant]:
    """For each per-layer constructor rule, one small int field moved by one so that the rule picks
    other layers (the other branch runs where the base config takes the first)."""
    found = []
    fields = {k: v for k, v in vars(tiny).items() if not k.startswith("_")}
    for test in _layer_rules(tree):
        base = predict_layers(tiny, test, tiny.num_hidden_layers)
        if base is None:
            continue
        for name, value in sorted(fields.items()):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or name == "num_hidden_layers"
                or not 0 <= value <= 16
            ):
                continue
            moved = None
            for other in (value + 1, value - 1):
                probe = copy.deepcopy(tiny)
                setattr(probe, name, other)
                layers = predict_layers(probe, test, probe.num_hidden_layers)
                if other >= 0 and layers is not None and layers != base:
                    moved = other
                    break
            if moved is not None:
                found.append(Variant(f"{name}={moved}", {name: moved}))
                break
    return found


def _width_switch_variants(tiny: PretrainedConfig, tree: ast.Module) -> list[Variant]:
    """A width the file tests for zero before building modules (``if config.hidden_size_per_layer_input:``,
    Gemma 4's per-layer inputs) that the test config sets: 0, so that the file runs without them too."""
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Attribute)
            and isinstance(node.test.value, ast.Name)
            and node.test.value.id == "config"
        ):
            continue
        name = node.test.attr
        value = getattr(tiny, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append(Variant(f"{name}=0", {name: 0}))
    return list({variant.label: variant for variant in found}.values())


def config_variants(
    tiny: PretrainedConfig,
    lean_source: str | None,
    logits: Callable[[dict[str, Any]], torch.Tensor | None],
) -> list[Variant]:
    """The candidates transformers builds and runs (``logits(overrides)`` is not None); of a group,
    the first that runs. Where a single flag cannot be flipped alone (InternLM3 wants its two bias
    flags equal), all flags flipped together are tried too."""
    kept: list[Variant] = []
    flags: dict[str, Any] = {}
    refused = False
    for variant in candidate_variants(tiny, lean_source):
        if variant.group == "rope" and any(k.group == "rope" for k in kept):
            continue
        runs = logits(variant.overrides) is not None
        if variant.group == "flag":
            flags.update(variant.overrides)
            refused = refused or not runs
        if runs:
            kept.append(variant)
    if refused and len(flags) > 1:
        together = Variant(",".join(f"{name}={value}" for name, value in flags.items()), flags)
        if logits(together.overrides) is not None:
            kept.append(together)
    return kept
