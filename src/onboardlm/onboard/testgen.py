"""Phase 6a: write the equivalence test file ``test_<model_type>_modeling.py`` for a lean model file.

The test compares the lean model with the transformers model of the same config at four levels
(``test_block_*``, ``test_layer_*``, ``test_model_*``, ``test_export_*``; ``verify`` reads the level
from that prefix). What to test is read from the transformers model built on the tiny config: its
decoder layers grouped into distinct kinds (layer type, module tree, per-layer attributes such as a
sliding window), and, inside one layer of each kind, its norm, MLP, MoE, attention and rotary
modules. The lean file mirrors transformers' module paths and class names, so each lean block is
found at the same path and asserted to be the class of the same name. Blocks and layers get exactly
the inputs their transformers counterparts received in one full forward (``testing.capture``).

Every fp32 check asserts an RMSE ratio of ``FP32_RMSE_TOL`` (chosen from the measured error of the
shipped ports and of the mutation catalogue's mildest bugs; the generated docstring has the numbers),
bf16 logits the seed's ``BF16_RMSE_TOL``. ``config_variants`` adds fp32 logit tests on configs that
take the lean file's other branches. The text is written plainly and formatted by the pinned ruff
(``generate.format_source``), as the model files are.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any

import jinja2
import torch
import transformers
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from onboardlm.errors import OnboardlmError, UnsupportedFeature
from onboardlm.onboard.analyze_hybrid import block_kind
from onboardlm.onboard.config_variants import Variant, config_variants
from onboardlm.onboard.generate import docstring_text, format_source
from onboardlm.onboard.spec_hybrid import TOKEN_MIXERS
from onboardlm.review.model_index import ModelIndex, Role
from onboardlm.review.source import SourceFile
from onboardlm.review.tests_rules import LAYER_KIND_FIELDS
from onboardlm.testing.capture import record_calls
from onboardlm.testing.random_init import randomize_constant_tensors
from onboardlm.testing.tiny_config import tiny_config

#: An attention input of RMS below this (the embeddings at initializer scale, read unnormalised by a
#: post-LN layer) gives scores so small that the softmax is flat and a 3 % scale error is invisible
#: (GPT-1: RMS 0.18, logits RMSE ratio 1.2e-6 for that bug); pre-LN layers read RMS 1.
QUIET_ATTENTION_RMS = 0.5

__all__ = [
    "BF16_RMSE_TOL",
    "FP32_RMSE_TOL",
    "BlockGroup",
    "LayerKind",
    "ReferenceLayout",
    "config_fields",
    "cover_lean_blocks",
    "generate_test_file",
    "keep_called",
    "lean_blocks",
    "make_test_config",
    "read_layout",
    "snake_case",
]

TEMPLATES = Path(__file__).parent / "templates"
#: Config fields always written out, so a reader sees the sizes even where they equal the defaults.
SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
#: Fields that describe the installed transformers, not the model.
IGNORED_FIELDS = frozenset({"transformers_version", "architectures", "dtype"})
#: Roles whose lean block does the same math as transformers' (also checked element-wise, 1e-3).
IDENTICAL_ROLES = frozenset({"norm", "mlp", "rotary"})
#: RMSE ratio every fp32 check asserts. Correct ports measure at most 6.3e-7 (logits; blocks 1.5e-7),
#: the mildest bug of the mutation catalogue 1.7e-4 or more: see the generated file's docstring.
FP32_RMSE_TOL = 1e-5
#: bf16 logits: rounding dominates, so the seed's tolerance stays.
BF16_RMSE_TOL = 0.05
#: Soft-caps in the test config: low enough that tanh bends on the test's activations, so a cap
#: that is off by a few percent changes the output (at the real 30 or 50 it hardly would).
TEST_SOFTCAP = 2.0
#: Query heads per KV head where the real config has none (MHA): grouping is then exercised.
TEST_KV_GROUP = 2


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """The first decoder layer of one kind: its path, class name and a short label for test ids."""

    path: str
    cls: str
    label: str


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Submodules of one transformers class with one role, to be tested against the lean class.

    mode: ``inputs`` (the lean block gets the hidden states, plus ``position_embeddings`` for
    attention), ``replay`` (it gets exactly the recorded arguments: rotary modules, and blocks whose
    lean forward has the transformers parameter names) or ``standalone`` (no layer of the test config
    uses the class: both are built from the config and fed random hidden states; no paths).
    """

    cls: str
    role: str
    paths: tuple[str, ...]
    mode: str = "inputs"
    repeated: bool = False  # some path is called more than once per forward: every call is checked
    #: transformers' block adds the residual it is given (BLOOM); in the lean file the layer does
    adds_residual: bool = False
    #: transformers' block returns its tokens flattened to ``[T, H]`` (Llama 4's MoE); the lean one
    #: keeps the input's shape
    flat_result: bool = False
    #: some call gets no ``position_ids``: the block counts positions from 0 itself (Llama 4's
    #: attention temperature), the test passes 0 .. seq - 1
    counts_positions: bool = False

    @property
    def test_name(self) -> str:
        return f"test_block_{snake_case(self.cls.replace('nn.', 'Torch'))}"

    @property
    def constant(self) -> str:
        return f"{snake_case(self.cls.replace('nn.', 'Torch')).upper()}_PATHS"

    @property
    def identical(self) -> bool:
        return self.role in IDENTICAL_ROLES


@dataclasses.dataclass(frozen=True)
class ReferenceLayout:
    """What the generated test covers, read from the transformers model on the tiny config."""

    causal_lm: str
    layers: tuple[LayerKind, ...]
    blocks: tuple[BlockGroup, ...]
    positional: bool = True  # lean layers and attention take position_embeddings (False: no RoPE)
    #: the first attention reads the embeddings unnormalised at their initializer scale (post-LN, GPT-1):
    #: the test draws them at unit scale so the softmax is not flat
    unit_embeddings: bool = False
    temperature: bool = False  # ... and the model's q scale per position too (Ministral3)
    #: ... and the store of keys and values some layers leave for others (cross-layer KV sharing)
    kv_shared: bool = False
    #: further inputs of the lean decoder layers, (name, position in transformers' layer forward): the
    #: recorded argument is passed on (Gemma 4's ``per_layer_input``)
    layer_inputs: tuple[tuple[str, int], ...] = ()
    #: the lean model's rotary module where transformers' attention holds its own and makes its tables
    #: from ``position_ids`` (RecurrentGemma): the tests make the tables with it ("": recorded tables)
    rotary_path: str = ""

    @property
    def tables(self) -> str:
        """Expression of the RoPE tables a lean layer or attention gets for a recorded ``call``."""
        if not self.rotary_path:
            return "call.position_embeddings"
        return (
            f'model.get_submodule("{self.rotary_path}")(call.hidden_states, call.argument("position_ids", 1))'
        )

    @property
    def routed(self) -> bool:
        """A mixture of experts is under test: bf16 rounding flips some tokens' expert choice."""
        return any(group.role == "moe" for group in self.blocks)

    @property
    def layer_classes(self) -> list[str]:
        return list(dict.fromkeys(kind.cls for kind in self.layers))


def snake_case(name: str) -> str:
    """``Qwen3MoeSparseMoeBlock`` -> ``qwen3_moe_sparse_moe_block``, ``LlamaRMSNorm`` -> ``llama_rms_norm``."""
    name = name.replace("MoE", "Moe")
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


# --------------------------------------------------------------------------------------------------
# Reading the transformers model
# --------------------------------------------------------------------------------------------------


def _role(module: nn.Module) -> str | None:
    name = type(module).__name__
    if any(child == "experts" for child, _ in module.named_children()):
        return "moe"
    if block_kind(module) in TOKEN_MIXERS - {"attention"}:  # an SSM or another non-attention mixer
        return "mixer"
    for suffix, role in (
        ("RotaryEmbedding", "rotary"),
        ("Attention", "attention"),
        ("MLP", "mlp"),
        ("Mlp", "mlp"),  # RecurrentGemmaMlp
        ("Norm", "norm"),
    ):
        if name.endswith(suffix):
            return role
    return None


def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of the decoder layers: ``...layers``, else the only list of ``num_layers``
    modules of one class (GPT-2's ``transformer.h``)."""
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    for name, module in lists:
        if name.endswith("layers"):
            return name, module
    uniform = [(name, module) for name, module in lists if len({type(m) for m in module}) == 1]
    if len(uniform) == 1:
        return uniform[0]
    raise UnsupportedFeature(
        type(model).__name__, f"no ModuleList 'layers' of {num_layers} decoder layers", "cannot test layers"
    )


_Feature = tuple[str, ...]  # ("layer type",), ("mlp",), ("module", path), ("attr", path, name)


def _layer_features(layer: nn.Module, layer_type: Any) -> dict[_Feature, Any]:
    """What makes a decoder layer its kind: layer type, dense/MoE, module tree, scalar attributes."""
    features: dict[_Feature, Any] = {("layer type",): layer_type}
    features[("mlp",)] = "moe" if any(_role(m) == "moe" for m in layer.modules()) else "dense"
    for path, module in layer.named_modules():
        features[("module", path)] = type(module).__name__
        for name, value in vars(module).items():
            scalar = isinstance(value, (bool, int, float, str)) or value is None
            if scalar and not name.startswith("_") and name not in ("training", "layer_idx"):
                features[("attr", path, name)] = value
    return features


def _labels(kinds: list[dict[_Feature, Any]]) -> list[str]:
    """Short test ids for layer kinds: the layer type and dense/moe where they differ, then (only if
    still ambiguous) the other differing scalar attributes, e.g. ``sliding_window=8``."""
    keys = list(dict.fromkeys(key for kind in kinds for key in kind))
    varying = [key for key in keys if len({repr(kind.get(key)) for kind in kinds}) > 1]
    labels = [[str(kind[key]) for key in varying if key[0] in ("layer type", "mlp")] for kind in kinds]
    if len({repr(label) for label in labels}) < len(labels):
        for label, kind in zip(labels, kinds, strict=True):
            attrs = {key[2]: kind.get(key) for key in varying if key[0] == "attr" and key[2] != "layer_type"}
            label += [f"{name}={value}" for name, value in attrs.items()]
    return ["-".join(label) for label in labels]


def _layer_kinds(layers_path: str, layers: nn.ModuleList, config: PretrainedConfig) -> tuple[LayerKind, ...]:
    layer_types = getattr(config, "layer_types", None)
    first: dict[str, tuple[int, dict[_Feature, Any]]] = {}
    for i, layer in enumerate(layers):
        features = _layer_features(layer, layer_types[i] if isinstance(layer_types, list) else None)
        first.setdefault(repr(sorted(features.items())), (i, features))
    kinds = list(first.values())
    labels = _labels([features for _, features in kinds]) if len(kinds) > 1 else [""]
    return tuple(
        LayerKind(
            f"{layers_path}.{i}", type(layers[i]).__name__, f"layer{i}" + (f"-{label}" if label else "")
        )
        for (i, _), label in zip(kinds, labels, strict=True)
    )


def _accessible(cls: type, hf_module: Any) -> bool:
    """A class of the transformers module itself: torch's own (Falcon imports ``LayerNorm`` from
    torch.nn) is used as is by the lean file, not ported, so it gets no block test."""
    return getattr(hf_module, cls.__name__, None) is cls and not cls.__module__.startswith("torch.")


def _under_tested_layer(path: str, layers_path: str, tested: set[str]) -> bool:
    """Outside the decoder layers, or inside one of the ``tested`` layers (not a layer itself)."""
    if not path.startswith(f"{layers_path}."):
        return True
    layer = ".".join(path.split(".")[: layers_path.count(".") + 2])
    return layer in tested and path != layer


def read_layout(reference: nn.Module, config: PretrainedConfig, hf_module: Any) -> ReferenceLayout:
    """Layer kinds and blocks of a transformers causal LM built on ``config``."""
    layers_path, layers = _decoder_layers(reference, config.num_hidden_layers)
    kinds = _layer_kinds(layers_path, layers, config)
    tested = {kind.path for kind in kinds}
    groups: dict[str, tuple[str, list[str]]] = {}
    for path, module in reference.named_modules():
        if not _under_tested_layer(path, layers_path, tested) or "experts" in path.split("."):
            continue
        role = _role(module)
        if role is not None and _accessible(type(module), hf_module):
            groups.setdefault(type(module).__name__, (role, []))[1].append(path)
        elif type(module) is nn.LayerNorm and path.startswith(f"{layers_path}."):
            # torch's own LayerNorm, used as is by the lean file: its epsilon expression is still
            # the file's (CTRL's layers hard-code 1e-6), checked on small inputs like a ported norm
            groups.setdefault("nn.LayerNorm", ("norm", []))[1].append(path)
    blocks = [
        BlockGroup(
            cls,
            role,
            tuple(paths),
            "replay" if role == "rotary" else "inputs",
            adds_residual=cls != "nn.LayerNorm"
            and "residual" in inspect.signature(getattr(hf_module, cls).forward).parameters,
        )
        for cls, (role, paths) in groups.items()
    ]
    inner = [path for group in blocks if group.role == "rotary" for path in group.paths]
    inner = [path for path in inner if path.startswith(f"{layers_path}.")]
    return ReferenceLayout(
        causal_lm=type(reference).__name__,
        layers=kinds,
        blocks=tuple(blocks),
        # a rotary module inside the layers: the lean file builds it once beside them
        rotary_path=f"{layers_path.rpartition('.')[0]}.{inner[0].rpartition('.')[2]}" if inner else "",
    )


# --------------------------------------------------------------------------------------------------
# Lean blocks that the transformers layout does not reach
# --------------------------------------------------------------------------------------------------

_REVIEW_ROLES = {Role.ATTENTION: "attention", Role.NORM: "norm", Role.MOE: "moe", Role.MLP: "mlp"}


def _lean_index(lean_source: str) -> ModelIndex:
    try:
        tree = ast.parse(lean_source)
    except SyntaxError as err:
        raise OnboardlmError("lean model source", f"does not parse: line {err.lineno}: {err.msg}") from err
    source = SourceFile(Path("<lean model file>"), lean_source, tree)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            source.parents[child] = parent
    return ModelIndex(source)


def lean_blocks(lean_source: str) -> dict[str, str]:
    """Lean classes that need a block test (as the review's G1 sees them), with their role: attention,
    norm and MoE classes, and MLP classes that a decoder layer builds."""
    index = _lean_index(lean_source)
    layer_names = {cls.name for cls in index.decoder_layers}
    built_by_layers = {c.cls for c in index.constructions if c.owner in layer_names}
    found = {}
    for cls in index.src.classes.values():
        role = index.role(cls)
        if role in (Role.ATTENTION, Role.NORM, Role.MOE) or (
            role is Role.MLP and cls.name in built_by_layers
        ):
            found[cls.name] = _REVIEW_ROLES[role]
    return found


def _lean_parameters(index: ModelIndex, cls: str, method: str) -> tuple[list[str], int] | None:
    """Parameter names of a lean method (without ``self``) and how many have no default."""
    for node in index.src.classes[cls].body:
        if isinstance(node, ast.FunctionDef) and node.name == method:
            names = [arg.arg for arg in node.args.args[1:]]
            return names, len(names) - len(node.args.defaults)
    return None


def _hf_parameters(function: Any) -> tuple[list[str], int]:
    params = [
        p
        for p in list(inspect.signature(function).parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return [p.name for p in params], sum(p.default is p.empty for p in params)


def _builds_from_config(hf_cls: type, index: ModelIndex, name: str, config: PretrainedConfig) -> bool:
    """Both classes are built as ``cls(config)`` and called as ``block(hidden_states)``."""
    lean_init, lean_forward = (
        _lean_parameters(index, name, "__init__"),
        _lean_parameters(index, name, "forward"),
    )
    if lean_init is None or lean_forward is None or lean_init[1] != 1 or lean_forward[1] != 1:
        return False
    if _hf_parameters(hf_cls.__init__)[1] != 1 or _hf_parameters(hf_cls.forward)[1] != 1:
        return False
    try:
        hf_cls(config)
    except Exception:  # any failure: not buildable from the config alone
        return False
    return True


def _subclasses_sequential(index: ModelIndex, name: str) -> bool:
    """Whether the lean class derives from ``nn.Sequential`` (a block transformers builds as one)."""
    return any(ast.unparse(base) == "nn.Sequential" for base in index.src.classes[name].bases)


def cover_lean_blocks(
    layout: ReferenceLayout, reference: nn.Module, config: PretrainedConfig, hf_module: Any, lean_source: str
) -> ReferenceLayout:
    """Add block tests for lean classes that ``layout`` does not test: replayed at their transformers
    path when the forward parameters match, else standalone when both build from the config."""
    index = _lean_index(lean_source)
    layers_path, _ = _decoder_layers(reference, config.num_hidden_layers)
    tested = {kind.path for kind in layout.layers}
    covered = {group.cls for group in layout.blocks}
    extra = []
    for name, role in lean_blocks(lean_source).items():
        hf_cls = getattr(hf_module, name, None)
        if hf_cls is None and _subclasses_sequential(index, name):  # CTRL's ffn: a bare nn.Sequential
            paths = tuple(
                path
                for path, module in reference.named_modules()
                if type(module) is nn.Sequential and _under_tested_layer(path, layers_path, tested)
            )
            if paths and name not in covered:
                extra.append(BlockGroup(name, role, paths, "inputs"))
            continue
        if name in covered or not isinstance(hf_cls, type):
            continue
        paths = tuple(
            path
            for path, module in reference.named_modules()
            if type(module) is hf_cls and _under_tested_layer(path, layers_path, tested)
        )
        lean_forward = _lean_parameters(index, name, "forward")
        if paths and lean_forward is not None and lean_forward[0] == _hf_parameters(hf_cls.forward)[0]:
            extra.append(BlockGroup(name, role, paths, "replay"))
        elif not paths and role in ("mlp", "moe") and _builds_from_config(hf_cls, index, name, config):
            extra.append(BlockGroup(name, role, (), "standalone"))
    return dataclasses.replace(layout, blocks=layout.blocks + tuple(extra))


def _takes_positions(lean_source: str, layout: ReferenceLayout, name: str = "position_embeddings") -> bool:
    """Whether the lean decoder layers take ``position_embeddings`` (models without RoPE do not), or
    ``name`` (``temperature``: only where attention scales q by position)."""
    index = _lean_index(lean_source)
    found = [
        _lean_parameters(index, cls, "forward") for cls in layout.layer_classes if cls in index.src.classes
    ]
    if not found:
        return name == "position_embeddings"
    return any(params is not None and name in params[0] for params in found)


def _layer_inputs(lean_source: str, layout: ReferenceLayout, hf_module: Any) -> tuple[tuple[str, int], ...]:
    """Parameters of the lean decoder layers beside hidden states, RoPE tables and temperature that
    transformers' layer of the same class takes too, with their position there."""
    index = _lean_index(lean_source)
    found = []
    for cls in layout.layer_classes:
        lean = _lean_parameters(index, cls, "forward") if cls in index.src.classes else None
        hf_cls = getattr(hf_module, cls, None)
        if lean is None or not isinstance(hf_cls, type):
            continue
        hf_names = list(inspect.signature(hf_cls.forward).parameters)[1:]
        found += [
            (name, hf_names.index(name))
            for name in lean[0]
            if name not in ("hidden_states", "position_embeddings", "temperature") and name in hf_names
        ]
    return tuple(dict.fromkeys(found))


def keep_called(layout: ReferenceLayout, reference: nn.Module) -> ReferenceLayout:
    """``layout`` without the block paths that one forward never calls; groups with a path called
    more than once (a rotary module per layer type, one q/k norm for both) check every call."""
    paths = [path for group in layout.blocks for path in group.paths]
    input_ids = torch.arange(16).reshape(2, 8) % reference.config.vocab_size
    positions = torch.arange(8)[None].expand(2, 8)
    try:
        calls = record_calls(
            reference.eval(), paths, input_ids=input_ids, position_ids=positions, use_cache=False
        )
    except Exception as err:  # transformers' own failure on this config
        raise UnsupportedFeature(
            type(reference).__name__,
            f"transformers cannot run the model on the test config: {type(err).__name__}: {err}",
            "check the config's fields",
        ) from err
    blocks = []
    for group in layout.blocks:
        kept = tuple(path for path in group.paths if calls[path])
        repeated = any(len(calls[path]) > 1 for path in kept)
        flat = any(
            isinstance(call.result, torch.Tensor)
            and call.result.dim() == 2
            and isinstance(call.hidden_states, torch.Tensor)
            and call.hidden_states.dim() == 3
            for path in kept
            for call in calls[path]
        )
        if kept or group.mode == "standalone":
            counts = group.role == "attention" and any(
                call.position_ids is None for path in kept for call in calls[path]
            )
            blocks.append(
                dataclasses.replace(
                    group, paths=kept, repeated=repeated, flat_result=flat, counts_positions=counts
                )
            )
    attention_inputs = [
        calls[path][0].hidden_states for group in blocks if group.role == "attention" for path in group.paths
    ]
    quiet = bool(attention_inputs) and _rms(attention_inputs[0]) < QUIET_ATTENTION_RMS
    return dataclasses.replace(layout, blocks=tuple(blocks), unit_embeddings=quiet)


def keep_lean_modules(layout: ReferenceLayout, lean_source: str) -> ReferenceLayout:
    """``layout`` without the block paths whose module the lean file inlines: the last name of the
    path (list indices aside) is no ``self.<name> = ...`` attribute of any lean class (Gemma 4's
    weightless ``v_norm``: a ``torch_rmsnorm`` call on a unit buffer)."""
    assigned = {
        target.attr
        for node in ast.walk(_lean_index(lean_source).src.tree)
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "self"
    }
    blocks = []
    for group in layout.blocks:
        kept = tuple(
            path for path in group.paths if [n for n in path.split(".") if not n.isdigit()][-1] in assigned
        )
        if kept or not group.paths:
            blocks.append(dataclasses.replace(group, paths=kept))
    return dataclasses.replace(layout, blocks=tuple(blocks))


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.float().pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# The test config as literals
# --------------------------------------------------------------------------------------------------


def _init_values(config: PretrainedConfig) -> dict[str, Any]:
    """Constructor fields and their values; on a heterogeneous config the global values of the fields
    ``per_layer_config`` overrides, and the overrides themselves (as ``to_dict`` writes them)."""
    get = getattr(config, "_getattr_without_heterogeneous_validation", None)
    values = {
        f.name: get(f.name) if get is not None else getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.init
    }
    if getattr(config, "is_heterogeneous", False):
        values["per_layer_config"] = config.to_dict()["per_layer_config"]
    return values


def _is_literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_literal(v) for k, v in value.items())
    return False


def python_literal(value: Any) -> str:
    """Source text of a literal value; non-finite floats (Mamba2's ``time_step_limit``) as ``float("inf")``."""
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    if isinstance(value, list):
        return f"[{', '.join(python_literal(v) for v in value)}]"
    if isinstance(value, tuple):
        return f"({''.join(python_literal(v) + ', ' for v in value)})"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k!r}: {python_literal(v)}' for k, v in value.items())}}}"
    return repr(value)


def _same_value(a: Any, b: Any) -> bool:
    """Equal, a list equal to a tuple of the same items too (a config read from config.json holds the
    list of a tuple default: NemotronH's ``time_step_limit`` (0.0, inf))."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def config_fields(tiny: PretrainedConfig) -> dict[str, Any]:
    """Constructor arguments that rebuild ``tiny``: sizes, layer-kind fields and non-default values."""
    cls = type(tiny)
    values = {k: v for k, v in _init_values(tiny).items() if k not in IGNORED_FIELDS}
    defaults = _init_values(cls())
    sizes = {*SIZE_FIELDS, *(cls.attribute_map.get(name, name) for name in SIZE_FIELDS)}  # BLOOM's n_layer
    chosen = {
        key: value
        for key, value in values.items()
        if key in sizes
        or (key in LAYER_KIND_FIELDS and value is not None)
        or not _same_value(value, defaults.get(key))
    }
    rebuilt = _init_values(cls(**chosen))
    chosen.update({key: value for key, value in values.items() if not _same_value(rebuilt.get(key), value)})
    rebuilt = _init_values(cls(**chosen))
    differing = sorted(key for key, value in values.items() if not _same_value(rebuilt.get(key), value))
    if differing:
        raise UnsupportedFeature(
            cls.__name__, f"the test config cannot be rebuilt from literals: {', '.join(differing)} differ"
        )
    for key, value in chosen.items():
        if not _is_literal(value):
            raise UnsupportedFeature(
                f"{cls.__name__}.{key}",
                f"value {value!r} cannot be written as a literal",
                "set it in the test",
            )
    return chosen


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _hf_causal_lm(config: PretrainedConfig) -> type[nn.Module]:
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise UnsupportedFeature(
            type(config).__name__,
            f"transformers has no causal LM for model_type {config.model_type!r}",
            "pass the text config of a causal LM",
        )
    return cls


def layer_constant(cls: str) -> str:
    """Name of the ``{id: path}`` constant of the decoder layers of class ``cls``."""
    return f"{snake_case(cls).upper()}S"


def _constants(layout: ReferenceLayout, variants: list[Variant]) -> str:
    """Module-level constants: layers by kind, block paths by class, recorded paths, config variants.

    Written on one line each; ``ruff format`` lays them out."""
    lines = ["# Decoder layers under test: the first layer of each distinct kind, by test id."]
    for cls in layout.layer_classes:
        kinds = {kind.label: kind.path for kind in layout.layers if kind.cls == cls}
        lines.append(f"{layer_constant(cls)} = {kinds!r}")
    lines.append("# Blocks under test (in the layers above and outside the layers), by transformers class.")
    recorded_blocks = [group for group in layout.blocks if group.paths]
    lines += [f"{group.constant} = {list(group.paths)!r}" for group in recorded_blocks]
    recorded = [f"*{layer_constant(cls)}.values()" for cls in layout.layer_classes]
    recorded += [f"*{group.constant}" for group in recorded_blocks]
    lines.append(f"RECORDED = [{', '.join(recorded)}]")
    if variants:
        lines.append(
            "# Config fields that take the lean file's branches the base config does not, by test id."
        )
        lines.append(f"CONFIG_VARIANTS = {python_literal({v.label: v.overrides for v in variants})}")
    return "\n".join(lines)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.globals.update(snake_case=snake_case, layer_constant=layer_constant)
    env.filters["docstring"] = docstring_text
    return env


def make_test_config(config: PretrainedConfig) -> PretrainedConfig:
    """``tiny_config(config)`` set up so that a wrong block cannot hide:

    - weights initialised at std 1/sqrt(hidden_size), so every block's output is of the order of the
      residual stream;
    - KV heads grouped (``TEST_KV_GROUP`` query heads each) where the real config has one KV head per
      query head, so a wrong query-to-KV-head mapping shows;
    - soft-caps at ``TEST_SOFTCAP``, where tanh bends on the test's activations.
    """
    try:
        tiny = tiny_config(config)
    except ValueError as err:
        raise UnsupportedFeature(
            type(config).__name__, str(err), "pass a text-only causal-LM config"
        ) from err
    if isinstance(getattr(tiny, "initializer_range", None), float):
        tiny.initializer_range = round(tiny.hidden_size**-0.5, 4)
    for name, value in _init_values(tiny).items():
        if "softcap" in name and isinstance(value, float):
            setattr(tiny, name, TEST_SOFTCAP)
    values = _init_values(tiny)
    heads = values.get("num_attention_heads")
    if (
        "num_key_value_heads" in values
        and not getattr(tiny, "is_heterogeneous", False)
        and isinstance(heads, int)
        and tiny.num_key_value_heads == heads
        and heads % TEST_KV_GROUP == 0
        and heads > TEST_KV_GROUP
    ):
        grouped = copy.deepcopy(tiny)
        grouped.num_key_value_heads = heads // TEST_KV_GROUP
        if _runs(grouped):  # MLA, for one, has no KV-head grouping
            tiny = grouped
    return tiny


def _classes_built(config: PretrainedConfig) -> set[type] | None:
    """The module classes of transformers' causal LM on ``config`` (built on the meta device)."""
    try:
        with torch.device("meta"):
            model = _hf_causal_lm(config)(type(config)(**config_fields(config), attn_implementation="eager"))
    except Exception:  # any failure: transformers does not take this config
        return None
    return {type(module) for module in model.modules()}


def reach_flagged_blocks(tiny: PretrainedConfig, lean_source: str) -> PretrainedConfig:
    """``tiny`` with the bool field flipped that makes transformers build a lean norm class its model
    lacks (Falcon-H1's gated norm, built only with ``mamba_rms_norm``), so that the block tests reach
    it; the flag's other value stays covered by its config variant. ``tiny`` when none is missing."""
    hf_module = importlib.import_module(_hf_causal_lm(tiny).__module__)
    built = _classes_built(tiny) or set()
    blocks = {
        cls for name in lean_blocks(lean_source) if isinstance(cls := getattr(hf_module, name, None), type)
    }
    norms = {
        cls
        for name, role in lean_blocks(lean_source).items()
        if role == "norm" and isinstance(cls := getattr(hf_module, name, None), type)
    }
    missing = norms - built  # MLP classes the layers do not reach get standalone tests instead
    if not missing:
        return tiny
    for name, value in tiny.to_dict().items():
        if not isinstance(value, bool) or name == "tie_word_embeddings":
            continue
        flipped = copy.deepcopy(tiny)
        setattr(flipped, name, not value)
        classes = _classes_built(flipped)
        if classes is not None and missing & classes and blocks & built <= classes and _runs(flipped):
            return flipped
    return tiny


def _runs(config: PretrainedConfig) -> bool:
    """transformers builds and runs its causal LM on ``config`` (written out as literals)."""
    try:
        model = _hf_causal_lm(config)(type(config)(**config_fields(config), attn_implementation="eager"))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()(input_ids=torch.zeros(1, 4, dtype=torch.long), position_ids=torch.arange(4)[None])
    except Exception:  # any failure: transformers does not take this config
        return False
    return True


def _hf_logits(hf_cls: type[nn.Module], config_cls: type, fields: dict[str, Any]) -> Any:
    """``logits(overrides)`` of transformers' model on ``fields`` + overrides, None if it fails."""

    def logits(overrides: dict[str, Any]) -> torch.Tensor | None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = hf_cls(config_cls(**{**fields, **overrides}, attn_implementation="eager")).eval()
                randomize_constant_tensors(model)
                ids = torch.arange(16).reshape(2, 8) % fields["vocab_size"]
                with torch.no_grad():
                    positions = torch.arange(8)[None].expand(2, 8)  # no cache: SSM-only stacks build none
                    return model(input_ids=ids, position_ids=positions, use_cache=False).logits
            except Exception:  # transformers cannot take this variant: no test for it
                return None

    return logits


def generate_test_file(
    config: PretrainedConfig, lean_module: str, model_type: str, *, lean_source: str | None = None
) -> str:
    """Source of ``test_<model_type>_modeling.py`` comparing ``lean_module`` with transformers.

    ``config`` is the real (text) config; the test uses its ``make_test_config`` written out as
    literals. ``lean_module`` is imported as written (``onboardlm.models.custom.modeling_x`` or
    ``modeling_x`` when the test sits next to the model file). With ``lean_source`` (the lean file's
    text), lean block classes that no layer of the test config reaches (a dense MLP class of a MoE
    model, an experts module) get tests too where that can be done without guessing, and the config
    variants cover the flags the lean file reads. The text is formatted by the pinned ruff, as the
    model files are. Raises ``UnsupportedFeature`` for a config without a transformers causal LM or
    whose test config cannot be written as literals.
    """
    tiny = make_test_config(config)
    if lean_source is not None:
        tiny = reach_flagged_blocks(tiny, lean_source)
    hf_cls = _hf_causal_lm(tiny)
    fields = config_fields(tiny)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            reference = hf_cls(type(tiny)(**fields, attn_implementation="eager"))
        except Exception as err:  # transformers' own failure on this config
            raise UnsupportedFeature(
                hf_cls.__name__,
                f"transformers cannot build the model on the test config: {type(err).__name__}: {err}",
                "check the config's fields",
            ) from err
    hf_module = importlib.import_module(hf_cls.__module__)
    layout = read_layout(reference, tiny, hf_module)
    if lean_source is not None:
        layout = cover_lean_blocks(layout, reference, tiny, hf_module, lean_source)
    layout = keep_called(layout, reference)
    if lean_source is not None:
        layout = keep_lean_modules(layout, lean_source)
        layout = dataclasses.replace(
            layout,
            positional=_takes_positions(lean_source, layout),
            temperature=_takes_positions(lean_source, layout, "temperature"),
            kv_shared=_takes_positions(lean_source, layout, "shared_kv"),
            layer_inputs=_layer_inputs(lean_source, layout, hf_module),
        )
    variants = [
        v
        for v in config_variants(tiny, lean_source, _hf_logits(hf_cls, type(tiny), fields))
        if _is_literal(v.overrides)
    ]
    config_cls = type(tiny)
    in_transformers = getattr(transformers, config_cls.__name__, None) is config_cls
    lean_package, _, lean_name = lean_module.rpartition(".")
    hf_package, _, hf_name = hf_cls.__module__.rpartition(".")
    template = _environment().get_template("test_modeling.py.j2")
    text = template.render(
        model_type=model_type,
        lean_module=lean_module,
        lean_import=f"from {lean_package} import {lean_name} as lean"
        if lean_package
        else f"import {lean_module} as lean",
        hf_import=f"from {hf_package} import {hf_name} as hf",
        config_import=f"from {'transformers' if in_transformers else config_cls.__module__} import {config_cls.__name__}",
        config_cls=config_cls.__name__,
        config_fields=python_literal(fields),
        constants=_constants(layout, variants),
        layout=layout,
        variants=variants,
        fp32_tol=FP32_RMSE_TOL,
        bf16_tol=BF16_RMSE_TOL,
        softcap=TEST_SOFTCAP,
    )
    return format_source(text)
