"""What the classes of a lean model file are, read from their structure rather than their names.

Roles come from what a class builds and calls: the class that ``register_custom_model_cls``
registers is the causal LM; classes deriving (in the file) from transformers' ``PreTrainedModel`` are
top-level models; the element class of a ``ModuleList`` built by a top-level model is a decoder
layer; a class that builds ``experts`` or calls a MoE op is a MoE block; a class whose code (or the
module-level helpers it calls) references an attention, norm or RoPE op is an attention, norm or
rotary module. A name (``...Attention``, ``...RMSNorm``, ``...Rotary...``, ``...MLP``) is only the
fallback when the structure says nothing, so files with other class names are judged alike.
"""

from __future__ import annotations

import ast
import enum
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from onboardlm.review.source import FUNCTION_TYPES, SourceFile, call_name, dotted_parts

AD = "torch.ops.auto_deploy."
ATTENTION_OPS = frozenset({"torch_attention", "torch_attention_sdpa", "torch_mla"})
NORM_OPS = frozenset({"torch_rmsnorm", "torch_rmsnorm_gated", "torch_l2norm"})
ROPE_OPS = frozenset(
    {"torch_rope_with_explicit_cos_sin", "torch_rope_with_complex_freqs", "torch_rope_with_qk_interleaving"}
)
MOE_OPS = frozenset({"torch_moe", "torch_moe_fused", "torch_moe_dense_mlp"})
PRETRAINED_MODEL = frozenset({"transformers.PreTrainedModel", "transformers.modeling_utils.PreTrainedModel"})
CONFIG_BASES = frozenset(
    {
        "transformers.PretrainedConfig",
        "transformers.PreTrainedConfig",
        "transformers.configuration_utils.PretrainedConfig",
        "transformers.configuration_utils.PreTrainedConfig",
    }
)
MODULE_LIST = frozenset({"torch.nn.ModuleList", "torch.nn.modules.container.ModuleList"})
#: Name suffixes of a causal-LM class: ``*ForCausalLM``, or ``*LMHeadModel`` where transformers names
#: its causal LM so (GPT-2, CTRL, OpenAI GPT) and the lean file mirrors the name.
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ROUTING_NAME = re.compile(r"rout|topk|top_k|moe|expert|gate(?!_proj)", re.IGNORECASE)
_MAX_HELPER_DEPTH = 4


class Role(str, enum.Enum):
    CAUSAL_LM = "causal LM"
    MODEL = "top-level model"
    DECODER_LAYER = "decoder layer"
    MOE = "MoE block"
    ATTENTION = "attention"
    NORM = "norm"
    ROTARY = "rotary embedding"
    MLP = "MLP"
    OTHER = "other"


@dataclass(frozen=True)
class Construction:
    """``self.<attr> = <cls>(...)`` (``in_list``: an element of a ModuleList or list) in ``owner``."""

    owner: str
    attr: str
    cls: str
    in_list: bool
    node: ast.AST


class ModelIndex:
    """Roles and constructions of the classes in one model file."""

    def __init__(self, source: SourceFile) -> None:
        self.src = source

    # ----------------------------------------------------------------- class hierarchy
    def bases(self, cls: ast.ClassDef) -> list[str]:
        return [q for base in cls.bases if (q := self.src.qualify(base)) is not None]

    def ancestors(self, cls: ast.ClassDef) -> Iterator[ast.ClassDef]:
        """``cls`` and its in-file base classes."""
        seen: set[str] = set()
        stack = [cls]
        while stack:
            current = stack.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            yield current
            stack.extend(self.src.classes[b] for b in self.bases(current) if b in self.src.classes)

    def derives_from(self, cls: ast.ClassDef, qualified: frozenset[str]) -> bool:
        return any(base in qualified for ancestor in self.ancestors(cls) for base in self.bases(ancestor))

    @cached_property
    def top_level(self) -> list[ast.ClassDef]:
        """Classes deriving from transformers' PreTrainedModel (in the file or directly)."""
        return [cls for cls in self.src.classes.values() if self.derives_from(cls, PRETRAINED_MODEL)]

    @cached_property
    def config_classes(self) -> list[ast.ClassDef]:
        """Config classes bundled in the file: deriving from transformers' base config or any of its configs."""
        return [
            cls
            for cls in self.src.classes.values()
            if any(
                base in CONFIG_BASES or (base.startswith("transformers") and base.endswith("Config"))
                for ancestor in self.ancestors(cls)
                for base in self.bases(ancestor)
            )
        ]

    # ----------------------------------------------------------------- registration
    @cached_property
    def registration(self) -> ast.Call | None:
        """The ``...register_custom_model_cls(...)`` call at module level, if any."""
        for node in self.src.tree.body:
            if (
                isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Call)
                and call_name(node.value) == "register_custom_model_cls"
            ):
                return node.value
        return None

    @cached_property
    def causal_lm(self) -> ast.ClassDef | None:
        """The ``*ForCausalLM`` (or ``*LMHeadModel``) class: the registered one, else the first defined."""
        call = self.registration
        if call is not None and len(call.args) > 1 and isinstance(call.args[1], ast.Name):
            registered = self.src.classes.get(call.args[1].id)
            if registered is not None and registered.name.endswith(CAUSAL_LM_SUFFIXES):
                return registered
        return next((c for c in self.src.classes.values() if c.name.endswith(CAUSAL_LM_SUFFIXES)), None)

    # ----------------------------------------------------------------- constructions
    @cached_property
    def constructions(self) -> list[Construction]:
        """Every ``self.<attr> = SomeClass(...)`` in a class method, ModuleList elements unpacked."""
        found = []
        for cls in self.src.classes.values():
            for node in ast.walk(cls):
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if isinstance(target, ast.Attribute) and dotted_parts(target.value) == ["self"]:
                        found.extend(
                            Construction(cls.name, target.attr, name, in_list, node)
                            for name, in_list in self._constructed(node.value)
                        )
        return found

    def _constructed(self, value: ast.expr) -> Iterator[tuple[str, bool]]:
        if isinstance(value, ast.IfExp):
            yield from self._constructed(value.body)
            yield from self._constructed(value.orelse)
            return
        if not isinstance(value, ast.Call):
            return
        if isinstance(value.func, ast.IfExp):  # (LayerA if cond else LayerB)(config, i): both classes
            for branch in (value.func.body, value.func.orelse):
                if isinstance(branch, ast.Name):
                    yield branch.id, False
                else:
                    yield from self._constructed(ast.Call(func=branch, args=[], keywords=[]))
            return
        target = self.src.call_target(value)
        if target in MODULE_LIST or call_name(value) == "ModuleList":
            for element in _list_elements(value):
                yield from ((name, True) for name, _ in self._constructed(element))
            return
        yield target, False

    def built_by(self, owner: str) -> list[Construction]:
        return [c for c in self.constructions if c.owner == owner]

    def attribute_classes(self, owner: str, attr: str) -> set[str]:
        return {c.cls for c in self.constructions if c.owner == owner and c.attr == attr}

    @cached_property
    def decoder_layers(self) -> list[ast.ClassDef]:
        """Element classes of ModuleLists built by top-level models, but rotary modules (a list of
        them holds one per RoPE base, as Granite-SWA's does)."""
        owners = {cls.name for cls in self.top_level}
        names = {c.cls for c in self.constructions if c.owner in owners and c.in_list}
        return [
            self.src.classes[n]
            for n in names
            if n in self.src.classes
            and not any("inv_freq" in buffer for buffer in self.buffer_names(self.src.classes[n]))
        ]

    @cached_property
    def moe_blocks(self) -> list[ast.ClassDef]:
        return [cls for cls in self.src.classes.values() if self.role(cls) is Role.MOE]

    # ----------------------------------------------------------------- what a class calls
    def reachable_code(self, node: ast.AST) -> list[ast.AST]:
        """``node`` and the module-level functions it calls by name, transitively."""
        found: list[ast.AST] = [node]
        names: set[str] = set()
        frontier: list[ast.AST] = [node]
        for _ in range(_MAX_HELPER_DEPTH):
            called = {
                call.func.id
                for code in frontier
                for call in ast.walk(code)
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            }
            new = [self.src.functions[n] for n in called - names if n in self.src.functions]
            names |= called
            found.extend(new)
            frontier = list(new)
        return found

    def ops_used(self, node: ast.AST) -> set[str]:
        """Names of the ``torch.ops.auto_deploy`` ops referenced by ``node`` and the helpers it calls."""
        refs = set()
        for code in self.reachable_code(node):
            for sub in ast.walk(code):
                if isinstance(sub, (ast.Attribute, ast.Name)):
                    qualified = self.src.qualify(sub) or ""
                    if qualified.startswith(AD):
                        refs.add(qualified[len(AD) :].split(".")[0])
        return refs

    def self_attributes(self, cls: ast.ClassDef) -> set[str]:
        return {c.attr for c in self.built_by(cls.name)} | {
            t.attr
            for node in ast.walk(cls)
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Attribute) and dotted_parts(t.value) == ["self"]
        }

    # ----------------------------------------------------------------- roles
    @cached_property
    def roles(self) -> dict[str, Role]:
        return {name: self._classify(cls) for name, cls in self.src.classes.items()}

    def role(self, cls: ast.ClassDef) -> Role:
        return self.roles[cls.name]

    def _classify(self, cls: ast.ClassDef) -> Role:
        if cls is self.causal_lm:
            return Role.CAUSAL_LM
        if cls in self.top_level:
            return Role.MODEL
        if cls in self.decoder_layers:
            return Role.DECODER_LAYER
        ops, attrs = self.ops_used(cls), self.self_attributes(cls)
        by_structure = [
            (Role.MOE, bool(ops & MOE_OPS) or "experts" in attrs),
            (Role.ATTENTION, bool(ops & ATTENTION_OPS)),
            (Role.NORM, bool(ops & NORM_OPS)),
            (Role.ROTARY, any("inv_freq" in name for name in self.buffer_names(cls))),
        ]
        for role, matches in by_structure:
            if matches:
                return role
        return _role_by_name(cls.name, attrs)

    def classes_with_role(self, role: Role) -> list[ast.ClassDef]:
        return [cls for cls in self.src.classes.values() if self.role(cls) is role]

    def buffer_names(self, cls: ast.ClassDef) -> list[str]:
        return [
            name.value
            for call in ast.walk(cls)
            if isinstance(call, ast.Call) and call_name(call) == "register_buffer" and call.args
            if isinstance(name := call.args[0], ast.Constant) and isinstance(name.value, str)
        ]

    def is_routing_code(self, node: ast.AST) -> bool:
        """Router math: code in a MoE block, or in a class or function named for routing or gating."""
        cls, fn = self.src.enclosing_class(node), self.src.enclosing_function(node)
        if cls is not None and (self.role(cls) is Role.MOE or ROUTING_NAME.search(cls.name)):
            return True
        return fn is not None and bool(ROUTING_NAME.search(fn.name))

    def method(self, cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        return next((n for n in cls.body if isinstance(n, FUNCTION_TYPES) and n.name == name), None)


#: "Rotary" or "RoPE" as a word of a class name (CamelCase or snake_case), not inside one ("SolarOpen").
ROTARY_CLASS_NAME = re.compile(r"Rotary|RoPE|Rope(?![a-z])|ROPE|(?:^|_)(?:rotary|rope)(?:_|$)")


def _role_by_name(name: str, attrs: set[str]) -> Role:
    lowered = name.lower()
    if ROTARY_CLASS_NAME.search(name):
        return Role.ROTARY
    if re.search(r"(attention|attn)$", lowered):
        return Role.ATTENTION
    if lowered.endswith("norm"):
        return Role.NORM
    mlp_attrs = [{"gate_proj", "down_proj"}, {"up_proj", "down_proj"}, {"fc1", "fc2"}, {"w1", "w2"}]
    if re.search(r"mlp$|feedforward|ffn$", lowered) or any(names <= attrs for names in mlp_attrs):
        return Role.MLP
    return Role.OTHER


def _list_elements(call: ast.Call) -> Iterator[ast.expr]:
    """What a ``ModuleList(...)`` call holds: generator/list-comprehension elements or list items."""
    for arg in call.args[:1]:
        if isinstance(arg, (ast.GeneratorExp, ast.ListComp)):
            yield arg.elt
        elif isinstance(arg, (ast.List, ast.Tuple)):
            yield from arg.elts
