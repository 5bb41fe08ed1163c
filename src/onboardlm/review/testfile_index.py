"""What each test of a test file exercises and how it compares, read from its syntax tree.

A test is read together with the code it reaches: the fixtures it requests (by parameter name) and
the module-level helper functions it calls, transitively. A reference resolves to a *lean* class
when its last name is a class of the model file and it does not come from ``transformers``; to a
*HuggingFace* reference when it comes from ``transformers`` (configs excepted). Tolerances must be
literals, module-level constants, or a helper's parameter bound to a literal at the call site:
anything else counts as unknown, which fails a tolerance requirement (strict).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from functools import cached_property

from onboardlm.review.model_index import ModelIndex
from onboardlm.review.source import (
    FUNCTION_TYPES,
    SourceFile,
    argument,
    call_name,
    constant_value,
    keyword_value,
)

FINITENESS = frozenset({"isfinite", "isnan", "isinf", "isposinf", "isneginf", "nan_to_num"})
METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_contiguous", "requires_grad"})
METADATA_CALLS = frozenset({"len", "isinstance", "type", "size", "dim", "numel", "hasattr"})
FACTORY_CALLS = frozenset({"AutoModelForCausalLMFactory", "build_model", "build_and_load"})
LOOPS = (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.DictComp, ast.SetComp)
_MAX_HELPER_DEPTH = 4


@dataclass(frozen=True)
class Comparison:
    """A numeric comparison: ``rmse`` (ratio tolerance), ``close`` (element-wise), ``exact``."""

    kind: str
    tol: float | None
    node: ast.AST

    def meets_identical(self) -> bool:
        """Identical math: element-wise with rtol and atol at most 1e-3, or exact."""
        return self.kind == "exact" or (self.kind == "close" and self.tol is not None and self.tol <= 1e-3)

    def meets_rmse(self, limit: float) -> bool:
        """An RMSE ratio of at most ``limit`` (an element-wise 1e-3 check is stricter and also meets it)."""
        if self.kind == "rmse":
            return self.tol is not None and self.tol <= limit
        return self.meets_identical()


@dataclass(frozen=True)
class ExportCall:
    """One ``torch_export_to_gm`` call and how the test uses the graph it returns."""

    node: ast.Call
    dynamic: bool
    compared: bool
    shapes: int


@dataclass
class TestCase:
    """One test function with the code it reaches."""

    node: ast.FunctionDef | ast.AsyncFunctionDef
    code: list[ast.AST]
    lean_classes: set[str] = field(default_factory=set)
    uses_hf: bool = False
    comparisons: list[Comparison] = field(default_factory=list)
    finiteness: list[ast.AST] = field(default_factory=list)
    raises: bool = False
    asserts: bool = False
    exports: list[ExportCall] = field(default_factory=list)
    cuda: list[ast.AST] = field(default_factory=list)
    varied: bool = False

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def line(self) -> int:
        return self.node.lineno


class TestIndex:
    """The tests of one test file, read against the model file's class roles."""

    __test__ = False  # not a pytest class

    def __init__(self, source: SourceFile, model: ModelIndex) -> None:
        self.src = source
        self.model = model

    # ----------------------------------------------------------------- collection
    @cached_property
    def fixtures(self) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
        return {
            fn.name: fn
            for fn in ast.walk(self.src.tree)
            if isinstance(fn, FUNCTION_TYPES)
            and any(self._decorator_name(d) == "fixture" for d in fn.decorator_list)
        }

    @cached_property
    def tests(self) -> list[TestCase]:
        found = []
        for node in self.src.tree.body:
            candidates = (
                node.body if isinstance(node, ast.ClassDef) and node.name.startswith("Test") else [node]
            )
            for fn in candidates:
                if isinstance(fn, FUNCTION_TYPES) and fn.name.startswith("test"):
                    found.append(self._read(fn))
        return found

    def _decorator_name(self, node: ast.expr) -> str:
        target = node.func if isinstance(node, ast.Call) else node
        return (self.src.qualify(target) or "").rsplit(".", 1)[-1]

    def _reach(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.AST]:
        """The test, the fixtures it requests and the helpers they call, transitively."""
        found: list[ast.AST] = [fn]
        frontier: list[ast.AST] = [fn]
        for _ in range(_MAX_HELPER_DEPTH):
            new: list[ast.AST] = []
            for code in frontier:
                names = {a.arg for a in code.args.args} if isinstance(code, FUNCTION_TYPES) else set()
                new += [self.fixtures[n] for n in names if n in self.fixtures]
                new += [
                    self.src.functions[c.func.id]
                    for c in ast.walk(code)
                    if isinstance(c, ast.Call)
                    and isinstance(c.func, ast.Name)
                    and c.func.id in self.src.functions
                ]
            new = [n for i, n in enumerate(new) if n not in found and n not in new[:i]]
            found += new
            frontier = new
        return found

    # ----------------------------------------------------------------- reading one test
    def _read(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> TestCase:
        case = TestCase(fn, self._reach(fn))
        callers = [c for code in case.code for c in ast.walk(code) if isinstance(c, ast.Call)]
        for code in case.code:
            for node in ast.walk(code):
                self._note(case, node, callers)
        case.exports = [self._export(call) for call in callers if call_name(call) == "torch_export_to_gm"]
        case.varied = self._is_varied(case)
        return case

    def _note(self, case: TestCase, node: ast.AST, callers: list[ast.Call]) -> None:
        if isinstance(node, (ast.Name, ast.Attribute)):
            qualified = self.src.qualify(node) or ""
            last = qualified.rsplit(".", 1)[-1]
            if qualified.startswith("transformers."):
                case.uses_hf = case.uses_hf or (last[:1].isupper() and not last.endswith("Config"))
            elif last in self.model.src.classes:
                case.lean_classes.add(last)
            elif last in FACTORY_CALLS and self.model.causal_lm is not None:
                case.lean_classes.add(self.model.causal_lm.name)
        elif isinstance(node, ast.Assert):
            case.asserts = True
            case.comparisons += self._assert_comparisons(node)
        elif isinstance(node, ast.Call):
            self._note_call(case, node, callers)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("cuda"):
            case.cuda.append(node)

    def _note_call(self, case: TestCase, call: ast.Call, callers: list[ast.Call]) -> None:
        name = call_name(call)
        if name in FINITENESS:
            case.finiteness.append(call)
        elif name in {"raises", "warns"}:
            case.raises = True
        elif name == "cuda":
            case.cuda.append(call)
        if name.startswith("assert"):
            case.asserts = True
        comparison = self._comparison(call, callers)
        if comparison is not None:
            case.comparisons.append(comparison)

    def _comparison(self, call: ast.Call, callers: list[ast.Call]) -> Comparison | None:
        name = call_name(call)
        if name == "assert_rmse_close":
            tol = self._number(argument(call, 2, "rmse_ratio_tol"), call, callers)
            return Comparison("rmse", tol, call)
        if name in {"assert_close", "allclose", "assert_allclose", "isclose"}:
            positional = name != "assert_close"
            rtol = keyword_value(call, "rtol") or (argument(call, 2, "rtol") if positional else None)
            atol = keyword_value(call, "atol") or (argument(call, 3, "atol") if positional else None)
            tols = [self._number(t, call, callers) for t in (rtol, atol)]
            if name == "allclose" and rtol is None and atol is None:
                tols = [1e-5, 1e-8]  # torch.allclose defaults, independent of dtype
            known = [t for t in tols if t is not None]
            tol = max(known) if len(known) == 2 else None
            return Comparison("exact" if tol == 0 else "close", tol, call)
        if name in {"equal", "assert_equal", "array_equal", "assert_array_equal"}:
            return Comparison("exact", 0.0, call)
        return None

    def _assert_comparisons(self, node: ast.Assert) -> list[Comparison]:
        """``assert a == b`` (exact) and ``assert err < 1e-3`` (close) on values, not metadata."""
        test = node.test
        if not isinstance(test, ast.Compare) or len(test.ops) != 1 or _is_metadata(test):
            return []
        if any(isinstance(n, ast.Call) and call_name(n) in FINITENESS for n in ast.walk(test)):
            return []
        operand = test.comparators[0]
        if isinstance(test.ops[0], (ast.Lt, ast.LtE)) and isinstance(value := constant_value(operand), float):
            return [Comparison("close", value, node)]
        if isinstance(test.ops[0], ast.Eq):
            return [Comparison("exact", 0.0, node)]
        return []

    def _number(self, expr: ast.expr | None, site: ast.AST, callers: list[ast.Call]) -> float | None:
        """A tolerance: literal, constant name, or a helper parameter bound to a literal by its callers."""
        value = constant_value(expr)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if not isinstance(expr, ast.Name):
            return None
        fn = self.src.enclosing_function(site)
        local = list(ast.walk(fn)) if fn is not None else []
        for statements in (local, self.src.tree.body):
            if (assigned := _constant_assignment(statements, expr.id)) is not None:
                return assigned
        return _bound_parameter(fn, expr.id, callers) if fn is not None else None

    # ----------------------------------------------------------------- export
    def _export(self, call: ast.Call) -> ExportCall:
        fn = self.src.enclosing_function(call)
        shapes = argument(call, 3, "dynamic_shapes")
        dynamic = shapes is not None and fn is not None and self._has_batch_and_seq(shapes, fn)
        graph = _assigned_name(self.src, call)
        uses = (
            [c for c in ast.walk(fn) if isinstance(c, ast.Call) and _calls_graph(c, graph)]
            if fn and graph
            else []
        )
        outputs = _names_assigned_from(fn, uses) if fn else set()
        compared = any(
            _mentions(arg, graph, outputs)
            for c in (ast.walk(fn) if fn else ())
            if isinstance(c, (ast.Call, ast.Assert)) and self._is_check(c)
            for arg in ast.iter_child_nodes(c)
        )
        in_loop = any(isinstance(a, LOOPS) for u in uses for a in self.src.ancestors(u))
        shapes_run = len({"|".join(ast.dump(a) for a in [*u.args, *u.keywords]) for u in uses})
        return ExportCall(call, dynamic, compared, 2 if in_loop and uses else shapes_run)

    def _is_check(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Assert):
            return bool(self._assert_comparisons(node))
        return isinstance(node, ast.Call) and self._comparison(node, []) is not None

    def _has_batch_and_seq(self, shapes: ast.expr, fn: ast.AST) -> bool:
        """Some input maps dims 0 and 1 to ``Dim`` values (or the shared causal-LM helper is used)."""
        shapes = _resolve_name(shapes, fn)
        if isinstance(shapes, ast.Call) and call_name(shapes) == "causal_lm_dynamic_shapes":
            return True
        for node in ast.walk(shapes):
            if isinstance(node, ast.Dict):
                keyed = {
                    constant_value(k): v for k, v in zip(node.keys, node.values, strict=True) if k is not None
                }
                if all(k in keyed and self._is_dim(keyed[k], fn) for k in (0, 1)):
                    return True
        return False

    def _is_dim(self, expr: ast.expr, fn: ast.AST) -> bool:
        expr = _resolve_name(expr, fn)
        target = expr.func if isinstance(expr, ast.Call) else expr
        return "Dim" in (self.src.qualify(target) or "").split(".")

    # ----------------------------------------------------------------- variation
    def _is_varied(self, case: TestCase) -> bool:
        """Parametrized, a fixture with params, or lean classes built in a loop (several layer kinds)."""
        if any(self._decorator_name(d) == "parametrize" for d in case.node.decorator_list):
            return True
        fixture_params = any(
            isinstance(d, ast.Call) and keyword_value(d, "params") is not None
            for code in case.code
            if code in self.fixtures.values()
            for d in code.decorator_list
        )
        return fixture_params or any(
            isinstance(call, ast.Call)
            and (self.src.qualify(call.func) or "").rsplit(".", 1)[-1] in self.model.src.classes
            for code in case.code
            for loop in ast.walk(code)
            if isinstance(loop, LOOPS)
            for call in ast.walk(loop)
        )

    # ----------------------------------------------------------------- queries
    def covering_class(self, name: str) -> list[TestCase]:
        return [case for case in self.tests if name in case.lean_classes]


def _is_metadata(test: ast.Compare) -> bool:
    for node in ast.walk(test):
        if isinstance(node, ast.Attribute) and node.attr in METADATA_ATTRS:
            return True
        if isinstance(node, ast.Call) and call_name(node) in METADATA_CALLS:
            return True
    return False


def _constant_assignment(nodes: list[ast.AST], name: str) -> float | None:
    for node in nodes:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            value = constant_value(node.value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def _bound_parameter(
    fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str, callers: list[ast.Call]
) -> float | None:
    """The largest literal that calls of ``fn`` bind to its parameter ``name`` (None if any is not literal)."""
    params = [a.arg for a in [*fn.args.posonlyargs, *fn.args.args]]
    defaults = dict(zip(params[len(params) - len(fn.args.defaults) :], fn.args.defaults, strict=True))
    if name not in params:
        return None
    index = params.index(name)
    values = []
    for call in callers:
        if isinstance(call.func, ast.Name) and call.func.id == fn.name:
            bound = argument(call, index, name) or defaults.get(name)
            value = constant_value(bound)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return None
            values.append(float(value))
    return max(values) if values else None


def _resolve_name(expr: ast.expr, scope: ast.AST) -> ast.expr:
    """A name's value when ``scope`` assigns it once (``x = ...`` or ``a, x = ..., ...``)."""
    if not isinstance(expr, ast.Name):
        return expr
    for node in ast.walk(scope):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == expr.id:
            return node.value
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            for element, value in zip(target.elts, node.value.elts, strict=False):
                if isinstance(element, ast.Name) and element.id == expr.id:
                    return value
    return expr


def _assigned_name(source: SourceFile, call: ast.Call) -> str | None:
    parent = source.parents.get(call)
    if (
        isinstance(parent, ast.Assign)
        and len(parent.targets) == 1
        and isinstance(parent.targets[0], ast.Name)
    ):
        return parent.targets[0].id
    return None


def _calls_graph(call: ast.Call, graph: str) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute) and func.attr == "forward":
        func = func.value
    return isinstance(func, ast.Name) and func.id == graph


def _names_assigned_from(fn: ast.AST, calls: list[ast.Call]) -> set[str]:
    names = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Assign) and any(c in calls for c in ast.walk(node.value)):
            names |= {t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    return names


def _mentions(expr: ast.AST, graph: str | None, outputs: set[str]) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, ast.Call) and graph and _calls_graph(node, graph):
            return True
        if isinstance(node, ast.Name) and node.id in outputs:
            return True
    return False
