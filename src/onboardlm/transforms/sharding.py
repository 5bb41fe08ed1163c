"""Tensor parallelism from the sharding hints of an exported lean model (``apply_sharding_hints``).

The pass reads the hint arguments the model file put on its canonical ops and rewrites one rank's copy
of the GraphModule in place:

- ``torch_linear_simple``: ``colwise`` keeps the rank's rows of the weight (and bias), each group of
  ``output_sizes`` cut separately; a group narrower than ``world_size * tp_min_local_shape`` (K/V with
  fewer KV heads than ranks) is replicated in ``tp_min_local_shape`` units, rank ``r`` taking unit
  ``r // (world_size / units)``, which is the KV head its query heads use. ``rowwise`` keeps the
  rank's columns; a bias stays on rank 0 only, so the all-reduce adds it once.
- a colwise output times a constant vector of its full width (a µP scale per output row, Falcon-H1's
  in_proj): the vector is cut like the rows.
- ``view``: ``shape[tp_scaled_dim]`` becomes the rank-local size (the producer linear's local/full
  width ratio when the view reads a sharded linear, else ``shape / world_size``).
- ``split_with_sizes`` with ``enable_sharding``: split sizes become rank-local in the same way; a split
  of a colwise linear or conv output (or of an activation of one) keeps each chunk's rows the rank holds.
- ``all_reduce``: a real sum over the ranks (``torch.ops._c10d_functional.all_reduce`` + ``wait_tensor``).
- ``torch_attention``: head counts follow from the sharded views; only per-head ``sinks`` are cut.
- ``torch_moe``: expert parallel. Rank ``r`` keeps experts ``[r*E/ws, (r+1)*E/ws)`` whole and sees
  expert ids shifted by its offset, so other ranks' experts fall outside its range and are skipped by
  the op; the ``all_reduce`` after the block sums the partial outputs. Whole experts keep each
  expert's GEMMs at full width (MoE intermediate sizes are small) and need no per-expert communication.
- ``torch_mla`` with ``enable_sharding``: ``kv_b_proj_weight`` is cut head-wise (the query heads come
  sharded from ``q_b_proj``/``q_proj`` colwise + ``view``).
- ``torch_causal_conv1d`` with ``shardable`` (depthwise only): the weight (and bias) is cut per
  channel, each ``output_sizes`` group evenly, matching the colwise in-projection that feeds it
  (Mamba2's x | B | C, the gated delta rule's q | k | v); ``groups`` becomes the local channel count.
- ``torch_ssm`` / ``torch_gated_delta_rule`` with ``shardable``: heads come sharded from the views;
  the per-head parameters (``A``, ``D``, ``dt_bias``; ``A_log``, ``dt_bias``) are cut along dim 0,
  also when the op reads them through elementwise ops (``-exp(A_log)``). Mamba2's B/C groups (views
  that scale the group dim) divide evenly, each rank keeping ``n_groups / world_size`` groups and the
  heads that read them, or are fewer than the ranks (``world_size`` a multiple of ``n_groups``, e.g.
  ``n_groups`` 1): then the B/C segments of the conv and of the in-projection that make them are kept
  in whole groups, rank ``r`` keeping the group its heads read. B/C that no view scales (Mamba1's,
  all-reduced from a rowwise ``x_proj``) are whole on every rank anyway.
- ``torch_channel_gated_delta_rule`` with ``shardable``: the parameters its decay and write strength
  read outside the sharded projections (``-exp(A_log) * softplus(a + dt_bias)``) are cut along their
  first dimension that is not 1 (dim 0, or the heads of Kimi Linear's ``A_log [1, 1, H, 1]``).
- ``torch_rg_lru`` with ``shardable``: its channels come sharded from a colwise projection and a
  depthwise conv; the block-diagonal gates (``[H, D, D]``, ``[H, D]``) are cut per head and the
  recurrence parameter ``[C]`` per channel, both along dim 0.
- ``torch_rmsnorm_gated``: ``colwise`` cuts the weight per channel. A rank holding whole norm groups
  keeps the op; a group spanning ranks (Mamba2 with fewer groups than ranks) is rewritten with a
  cross-rank sum of squares (:mod:`onboardlm.transforms.spanning_norm`). ``none`` (a per-head norm)
  keeps the weight whole.

``shard_layers`` restricts the pass to some ``layer_type`` hints (the rest stays replicated). Shape
metadata (``node.meta["val"]``) is re-propagated afterwards, so later passes (KV cache) see rank-local
shapes; run this pass before ``use_direct_kernels``, which drops the ``all_reduce`` hint nodes. :func:`plan_sharding` validates a graph for a world size without touching it, so
callers can reject a model before any process group exists.
"""

from __future__ import annotations

import logging
import operator
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import onboardlm.ops  # noqa: F401  (registers torch.ops.auto_deploy.*)
from onboardlm.errors import OnboardlmError, UnsupportedFeature
from onboardlm.transforms.dump import dumps_graph
from onboardlm.transforms.graph_tensors import drop_unread, graph_tensor
from onboardlm.transforms.spanning_norm import replace_spanning_gated_norm

log = logging.getLogger(__name__)

_AD = torch.ops.auto_deploy
_LINEAR = _AD.torch_linear_simple.default
_VIEW = _AD.view.default
_SPLIT = _AD.split_with_sizes.default
_ALL_REDUCE = _AD.all_reduce.default
_ATTENTION = _AD.torch_attention.default
_MOE = _AD.torch_moe.default
_MLA = _AD.torch_mla.default
_SPARSE_MLA = _AD.torch_sparse_mla.default  # MLA over the keys a lightning indexer selects: sharded alike
_CONV = _AD.torch_causal_conv1d.default
_SSM = _AD.torch_ssm.default
_DELTA = _AD.torch_gated_delta_rule.default
_CHANNEL_DELTA = _AD.torch_channel_gated_delta_rule.default
_RG_LRU = _AD.torch_rg_lru.default
_GATED_NORM = _AD.torch_rmsnorm_gated.default
_HANDLED = {
    _LINEAR,
    _VIEW,
    _SPLIT,
    _ALL_REDUCE,
    _ATTENTION,
    _MOE,
    _MLA,
    _SPARSE_MLA,
    _CONV,
    _SSM,
    _DELTA,
    _CHANNEL_DELTA,
    _RG_LRU,
    _GATED_NORM,
}


class ShardingError(OnboardlmError):
    """A model or world size that hint-driven tensor parallelism cannot shard."""


@dataclass(frozen=True)
class ParamShard:
    """One rank's part of a parameter: the ``ranges`` (start, stop) of dimension ``dim``, concatenated."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def local_size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        """The rank's part of ``full`` as a new contiguous tensor."""
        parts = [full.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return torch.cat(parts, dim=self.dim).contiguous()


@dataclass
class ShardingReport:
    """What :func:`apply_sharding_hints` changed on one rank."""

    rank: int
    world_size: int
    changed: Counter[str] = field(default_factory=Counter)  # nodes changed per op kind
    params: dict[str, ParamShard] = field(default_factory=dict)  # parameter -> the part this rank holds
    dropped: list[str] = field(default_factory=list)  # parameters this rank does not hold at all

    @property
    def nodes_changed(self) -> int:
        return sum(self.changed.values())


@dataclass
class ShardingPlan:
    """Graph edits for one rank, computed by :func:`plan_sharding` before anything is changed."""

    report: ShardingReport
    new_args: list[tuple[Node, str, Any]] = field(default_factory=list)
    expert_offsets: list[tuple[Node, int]] = field(default_factory=list)
    all_reduces: list[Node] = field(default_factory=list)
    partial: set[Node] = field(default_factory=set)  # nodes whose output is a per-rank partial sum
    local_width: dict[Node, tuple[int, int]] = field(default_factory=dict)  # (full, local) last dim
    rows: dict[Node, ParamShard] = field(default_factory=dict)  # output channels kept (colwise linear, conv)
    # output_sizes groups kept whole in units (B/C of SSM groups fewer than ranks): node -> {group: units}
    group_units: dict[Node, dict[int, int]] = field(default_factory=dict)
    spanning_norms: list[tuple[Node, int, int]] = field(default_factory=list)  # (gated norm, slot, slots)

    def shard(self, param: Node, shard: ParamShard) -> None:
        name = _param_name(param)
        previous = self.report.params.get(name)
        if previous is not None and previous != shard:
            raise UnsupportedFeature(name, "parameter used by two ops with different sharding")
        self.report.params[name] = shard


def _args(node: Node) -> dict[str, Any]:
    """The node's arguments by name, defaults filled in."""
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    assert normalized is not None, f"cannot normalise the arguments of {node.format_node()}"
    defaults = {a.name: a.default_value for a in node.target._schema.arguments if a.has_default_value()}
    return {**defaults, **normalized.kwargs}


def _set_arg(node: Node, name: str, value: Any) -> None:
    names = [a.name for a in node.target._schema.arguments]
    index = names.index(name)
    if index < len(node.args):
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _param_name(node: Node) -> str:
    return str(node.target)


def _param(gm: GraphModule, node: Any, role: str, user: Node) -> Node:
    """``node`` as a ``get_attr`` of a tensor of ``gm``; anything else cannot be cut in place."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        raise UnsupportedFeature(user.name, f"{role} of {user.target} is computed, not a parameter")
    return node


def _shape(gm: GraphModule, node: Node) -> torch.Size:
    return graph_tensor(gm, _param_name(node)).shape


def _even_range(size: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    if size % world_size:
        raise ShardingError(what, f"size {size} is not divisible by world size {world_size}")
    local = size // world_size
    return rank * local, (rank + 1) * local


def _group_range(size: int, min_local: int, rank: int, world_size: int, what: str) -> tuple[int, int]:
    """Rank ``rank``'s rows of a colwise group of ``size`` rows, at least ``min_local`` wide."""
    if size % world_size == 0 and (size // world_size) % min_local == 0:
        return _even_range(size, rank, world_size, what)
    units = size // min_local
    if size % min_local == 0 and world_size % units == 0:  # fewer units (KV heads) than ranks: replicate
        start = rank // (world_size // units) * min_local
        return start, start + min_local
    raise ShardingError(
        what,
        f"{size} output features in units of {min_local} cannot be split over world size {world_size}",
        "choose a world size that divides the head counts",
    )


def _plan_linear(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    mode = args["tp_mode"]
    if mode == "none":
        return
    rank, world_size = plan.report.rank, plan.report.world_size
    weight = _param(gm, args["weight"], "weight", node)
    bias = args["bias"]
    what = f"{_param_name(weight)} ({mode})"
    out_features, in_features = _shape(gm, weight)
    if mode == "colwise":
        groups = args["output_sizes"] or [out_features]
        if sum(groups) != out_features:
            raise ShardingError(what, f"output_sizes {groups} do not add up to {out_features} rows")
        units = plan.group_units.get(node, {})
        ranges, offset = [], 0
        for index, size in enumerate(groups):
            unit = size // units[index] if index in units else args["tp_min_local_shape"]
            start, stop = _group_range(size, unit, rank, world_size, what)
            ranges.append((offset + start, offset + stop))
            offset += size
        shard = ParamShard(0, tuple(ranges))
        plan.shard(weight, shard)
        if bias is not None:
            plan.shard(_param(gm, bias, "bias", node), shard)
        plan.local_width[node] = (out_features, shard.local_size)
        plan.rows[node] = shard
    else:
        plan.shard(weight, ParamShard(1, (_even_range(in_features, rank, world_size, what),)))
        if bias is not None and rank != 0:
            plan.report.dropped.append(_param_name(_param(gm, bias, "bias", node)))
            plan.new_args.append((node, "bias", None))
        plan.partial.add(node)
    plan.report.changed["linear"] += 1


def _local(size: int, source: Node, plan: ShardingPlan, what: str) -> int:
    """Rank-local size of a dimension of ``size`` of a tensor computed from ``source``.

    When ``source`` is a colwise linear (or a chunk of one), the local/full width ratio of its output
    gives the size, which covers replicated KV heads; otherwise it is ``size / world_size``.
    """
    if source in plan.local_width:
        full, local = plan.local_width[source]
        if (size * local) % full == 0:
            return size * local // full
    if size % plan.report.world_size:
        raise ShardingError(
            what,
            f"size {size} is not divisible by world size {plan.report.world_size}",
            "choose a world size that divides the head counts",
        )
    return size // plan.report.world_size


def _plan_view(node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    dim = args["tp_scaled_dim"]
    if dim == -1:
        return
    shape = list(args["shape"])
    if not isinstance(shape[dim], int):
        raise UnsupportedFeature(node.name, f"view scales dimension {dim}, which is dynamic")
    shape[dim] = _local(shape[dim], args["x"], plan, f"view {node.name} dim {dim}")
    plan.new_args.append((node, "shape", shape))
    plan.report.changed["view"] += 1


def _kept(shard: ParamShard, start: int, stop: int) -> int:
    """How many of the rows ``[start, stop)`` ``shard`` keeps."""
    return sum(max(0, min(stop, b) - max(start, a)) for a, b in shard.ranges)


def _rows_of(source: Node, plan: ShardingPlan) -> ParamShard | None:
    """The output channels the rank keeps of ``source``: those of the colwise linear or conv it is,
    or that it takes elementwise (an activation or cast in between); None if unknown."""
    while source not in plan.rows:
        inputs = source.all_input_nodes
        if source.op != "call_function" or len(inputs) != 1 or not _same_last_dim(source, inputs[0]):
            return None
        source = inputs[0]
    return plan.rows[source]


def _same_last_dim(a: Node, b: Node) -> bool:
    """Whether both nodes are tensors with the same static last dimension."""
    values = [n.meta.get("val") for n in (a, b)]
    if not all(isinstance(v, torch.Tensor) and v.dim() > 0 for v in values):
        return False
    sizes = [v.shape[-1] for v in values]
    return all(type(size) is int for size in sizes) and sizes[0] == sizes[1]


def _plan_split(node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["enable_sharding"]:
        return
    source, sizes = args["x"], list(args["split_sizes"])
    rows = _rows_of(source, plan)
    if rows is not None:  # the chunks keep the rows of them the rank holds
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        local = [_kept(rows, start, start + size) for start, size in zip(offsets, sizes, strict=True)]
    else:
        local = [_local(s, source, plan, f"split {node.name}") for s in sizes]
    for user in node.users:
        if user.target is operator.getitem:
            plan.local_width[user] = (sizes[user.args[1]], local[user.args[1]])
    plan.new_args.append((node, "split_sizes", local))
    plan.report.changed["split_with_sizes"] += 1


_MULS = (torch.ops.aten.mul.Tensor, operator.mul)


def _plan_row_scale(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    """A colwise output times a constant vector of its full width (Falcon-H1's µP scale of each
    in_proj row): the vector is cut like the rows, and the product keeps them."""
    if len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
        return
    for source, vector in (node.args, node.args[::-1]):
        rows = _rows_of(source, plan)
        if rows is None or vector.op != "get_attr":
            continue
        shape = _shape(gm, vector)
        full = plan.local_width.get(source, (None, None))[0]
        if len(shape) == 0 or shape[-1] != full or any(size != 1 for size in shape[:-1]):
            continue
        plan.shard(vector, ParamShard(len(shape) - 1, rows.ranges))
        plan.rows[node] = rows
        plan.local_width[node] = plan.local_width[source]
        plan.report.changed["row_scale"] += 1
        return


def _plan_attention(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    sinks = _args(node)["sinks"]
    if sinks is None:
        return
    sinks = _param(gm, sinks, "sinks", node)
    (heads,) = _shape(gm, sinks)
    what = f"{_param_name(sinks)} (attention sinks)"
    plan.shard(sinks, ParamShard(0, (_even_range(heads, plan.report.rank, plan.report.world_size, what),)))
    plan.report.changed["attention"] += 1


def _plan_moe(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    rank, world_size = plan.report.rank, plan.report.world_size
    num_experts = len(args["w1_weight"])
    start, stop = _even_range(num_experts, rank, world_size, f"{node.name} (number of MoE experts)")
    for name in ("w1_weight", "w2_weight", "w3_weight"):
        weights = [_param(gm, w, name, node) for w in args[name]]
        plan.report.dropped += [_param_name(w) for w in weights[:start] + weights[stop:]]
        plan.new_args.append((node, name, weights[start:stop]))
    plan.expert_offsets.append((node, start))
    plan.partial.add(node)
    plan.report.changed["moe"] += 1


def _plan_mla(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["enable_sharding"]:
        return
    weight = _param(gm, args["kv_b_proj_weight"], "kv_b_proj_weight", node)
    heads = int(args["q_nope"].meta["val"].shape[1 if args["layout"] == "bnsd" else 2])
    rows = _shape(gm, weight)[0]
    what = f"{_param_name(weight)} ({heads} MLA heads)"
    first, last = _even_range(heads, plan.report.rank, plan.report.world_size, what)
    per_head = rows // heads
    plan.shard(weight, ParamShard(0, ((first * per_head, last * per_head),)))
    plan.report.changed["mla"] += 1


def _per_channel(
    size: int, groups: Sequence[int], units: dict[int, int], plan: ShardingPlan, what: str
) -> ParamShard:
    """Rank-local channels of a dim of ``size`` made of ``groups``, each cut evenly (dim 0), except the
    groups in ``units`` (index -> units), kept in whole units like :func:`_group_range`."""
    if sum(groups) != size:
        raise ShardingError(what, f"output_sizes {list(groups)} do not add up to {size} channels")
    rank, world_size = plan.report.rank, plan.report.world_size
    ranges, offset = [], 0
    for index, group in enumerate(groups):
        if index in units:
            start, stop = _group_range(group, group // units[index], rank, world_size, what)
        else:
            start, stop = _even_range(group, rank, world_size, what)
        ranges.append((offset + start, offset + stop))
        offset += group
    return ParamShard(0, tuple(ranges))


def _plan_conv(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["shardable"]:
        return
    weight = _param(gm, args["weight"], "weight", node)
    channels, per_group = _shape(gm, weight)[:2]
    what = f"{_param_name(weight)} (causal conv1d)"
    if args["groups"] != channels or per_group != 1:
        raise UnsupportedFeature(
            what, f"a conv1d with {args['groups']} groups over {channels} channels (only depthwise is cut)"
        )
    groups = args["output_sizes"] or [channels]
    shard = _per_channel(channels, groups, plan.group_units.get(node, {}), plan, what)
    plan.shard(weight, shard)
    if args["bias"] is not None:
        plan.shard(_param(gm, args["bias"], "bias", node), shard)
    plan.new_args.append((node, "groups", shard.local_size))
    if args["output_sizes"] is not None:
        plan.new_args.append((node, "output_sizes", [stop - start for start, stop in shard.ranges]))
    plan.local_width[node] = (channels, shard.local_size)
    plan.rows[node] = shard
    plan.report.changed["conv"] += 1


def _head_count(node: Any, dim: int, user: Node) -> int:
    value = node.meta.get("val") if isinstance(node, Node) else None
    if value is None:
        raise UnsupportedFeature(user.name, f"input of {user.target} without a known shape")
    return int(value.shape[dim])


def _plan_per_head(gm: GraphModule, node: Node, names: Sequence[str], heads: int, plan: ShardingPlan) -> None:
    """Cut every parameter that feeds the per-head arguments ``names`` of ``node`` along dim 0.

    An argument may be a parameter or computed from parameters only (``-exp(A_log)``,
    ``dt_bias[:, None].expand(...).flatten()``); a parameter's dim 0 is its heads (or channels that
    map to heads in order), so an even cut keeps each rank's heads.
    """
    args = _args(node)
    for name in names:
        value = args[name]
        if not isinstance(value, Node):
            raise UnsupportedFeature(node.name, f"{name} of {node.target} is not a tensor")
        params, seen, stack = [], set(), [value]
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.op == "get_attr":
                params.append(current)
            elif current.op == "placeholder":
                raise UnsupportedFeature(
                    node.name,
                    f"{name} of {node.target} depends on the input (a per-head parameter is expected)",
                )
            else:
                stack.extend(current.all_input_nodes)
        if _head_count(value, 0, node) != heads:
            raise UnsupportedFeature(node.name, f"{name} of {node.target} is not one value per head")
        for param in params:
            size = _shape(gm, param)[0]
            what = f"{_param_name(param)} ({name} of {heads} heads)"
            plan.shard(
                param, ParamShard(0, (_even_range(size, plan.report.rank, plan.report.world_size, what),))
            )


def _check_mixer_heads(node: Node, plan: ShardingPlan) -> None:
    """Refuse a shardable SSM / gated delta rule whose head groups do not split over the ranks.

    Run before the views are planned, so the reason names the mixer rather than a reshape. An SSM whose
    B/C groups are fewer than the ranks (``n_groups`` 1) gets its B/C segments kept whole, in units of one
    group, wherever they are made (:func:`_replicate_groups`): each rank's heads read one group.
    """
    args = _args(node)
    if not args["shardable"]:
        return
    world_size = plan.report.world_size
    if node.target == _SSM:
        heads, groups = _head_count(args["hidden_states"], 2, node), _head_count(args["B"], 2, node)
        sharded = _scaled_view(args["B"], 2) and _scaled_view(args["C"], 2)
        if heads % world_size or (sharded and groups % world_size and world_size % groups):
            raise ShardingError(
                f"{node.name} (Mamba2 SSM)",
                f"{heads} heads in {groups} B/C groups cannot be split over world size {world_size}",
                "choose a world size that divides the heads and divides or is a multiple of n_groups",
            )
        if sharded and groups % world_size:
            for name in ("B", "C"):
                _replicate_groups(_args(args[name])["x"], groups, node, plan)
    else:
        k_heads = _head_count(args["q"], 2, node)
        if k_heads % world_size:
            raise ShardingError(
                f"{node.name} (gated delta rule)",
                f"{k_heads} key heads cannot be split over world size {world_size}",
                "choose a world size that divides the linear-attention key heads",
            )


def _scaled_view(value: Any, dim: int) -> bool:
    """Whether ``value`` is a hint ``view`` that scales dimension ``dim`` (B/C groups cut over the ranks);
    any other B/C is whole on every rank (Mamba1's, all-reduced from a rowwise projection)."""
    return isinstance(value, Node) and value.target == _VIEW and _args(value)["tp_scaled_dim"] == dim


def _last_dim(node: Node, user: Node) -> int:
    return _head_count(node, -1, user)


def _replicate_groups(start: Node, units: int, user: Node, plan: ShardingPlan) -> None:
    """Keep the channels of ``start`` whole in ``units`` units: follow them back through split chunks,
    one-input ops and depthwise convs to the ``output_sizes`` groups of the convs and the colwise
    projection that make them, and record those groups in ``plan.group_units``."""
    node, first, last = start, 0, _last_dim(start, user)
    while True:
        if node.op == "call_function" and node.target in (_LINEAR, _CONV):
            args = _args(node)
            sizes = args["output_sizes"] or [_last_dim(node, user)]
            spans = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
            if (first, last) not in spans:
                raise UnsupportedFeature(
                    user.name,
                    f"B/C channels [{first}, {last}) of {node.name} are not one of its output_sizes {sizes}",
                )
            plan.group_units.setdefault(node, {})[spans.index((first, last))] = units
            if node.target == _LINEAR:
                return
            node = args["input"]  # depthwise: the same channels of the input
        elif node.target is operator.getitem and node.args[0].target == _SPLIT:
            split = _args(node.args[0])
            offset = sum(split["split_sizes"][: node.args[1]])
            node, first, last = split["x"], first + offset, last + offset
        elif len(node.all_input_nodes) == 1 and _same_last_dim(node, node.all_input_nodes[0]):
            node = node.all_input_nodes[0]  # elementwise (activation, cast)
        else:
            raise UnsupportedFeature(
                user.name,
                f"B/C groups fewer than ranks pass {node.name} ({node.target}), which is not followed",
            )


def _plan_ssm(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["shardable"]:
        return
    heads = _head_count(args["hidden_states"], 2, node)
    _plan_per_head(gm, node, ("A", "D", "dt_bias"), heads, plan)
    plan.report.changed["ssm"] += 1


def _plan_delta(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["shardable"]:
        return
    v_heads = _head_count(args["v"], 2, node)
    _plan_per_head(gm, node, ("A_log", "dt_bias"), v_heads, plan)
    plan.report.changed["delta"] += 1


def _plan_channel_delta(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    """The per-channel-decay delta rule takes its decay ``g`` and write strength ``beta`` computed by the
    model: the parameters they read outside the sharded projections (``A_log``, ``dt_bias``, per head or
    per head channel along dim 0) are cut evenly, like the heads."""
    args = _args(node)
    if not args["shardable"]:
        return
    stop = {_LINEAR, _VIEW, _SPLIT, _CONV}
    seen, stack = set(), [args["g"], args["beta"]]
    while stack:
        current = stack.pop()
        if not isinstance(current, Node) or current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            shape = _shape(gm, current)
            if not shape:
                continue  # a scalar is the same on every rank
            what = f"{_param_name(current)} (decay or write strength of the per-channel delta rule)"
            # the heads' dimension: the first that is not 1 (Kimi Linear's A_log is [1, 1, H, 1])
            dim = next((i for i, size in enumerate(shape) if size != 1), 0)
            range_ = _even_range(shape[dim], plan.report.rank, plan.report.world_size, what)
            plan.shard(current, ParamShard(dim, (range_,)))
        elif current.op == "call_function" and (current.target in stop or current.target is operator.getitem):
            continue  # already this rank's heads
        else:
            stack.extend(current.all_input_nodes)
    plan.report.changed["delta"] += 1


def _plan_rg_lru(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if not args["shardable"]:
        return
    heads = _head_count(args["input_gate_weight"], 0, node)
    if heads % plan.report.world_size:
        raise ShardingError(
            f"{node.name} (RG-LRU)",
            f"{heads} gate blocks cannot be split over world size {plan.report.world_size}",
            "choose a world size that divides the recurrent block's heads",
        )
    gates = ("input_gate_weight", "input_gate_bias", "recurrent_gate_weight", "recurrent_gate_bias")
    _plan_per_head(gm, node, gates, heads, plan)
    _plan_per_head(gm, node, ("recurrent_param",), _head_count(args["x"], -1, node), plan)
    plan.report.changed["ssm"] += 1


def _plan_gated_norm(gm: GraphModule, node: Node, plan: ShardingPlan) -> None:
    args = _args(node)
    if args["tp_mode"] == "none":
        return
    if args["tp_mode"] != "colwise":
        raise UnsupportedFeature(node.name, f"tp_mode {args['tp_mode']!r} of a gated RMSNorm")
    weight = _param(gm, args["weight"], "weight", node)
    (channels,) = _shape(gm, weight)
    what = f"{_param_name(weight)} (gated RMSNorm)"
    shard = ParamShard(0, (_even_range(channels, plan.report.rank, plan.report.world_size, what),))
    local, group = shard.local_size, args["group_size"]
    if local % group:  # a group spans ranks: its sum of squares is added up over them
        if group % local:
            raise ShardingError(
                what,
                f"norm groups of {group} channels do not fit {local} channels per rank",
                "choose a world size that divides n_groups or is a multiple of it",
            )
        plan.spanning_norms.append((node, shard.ranges[0][0] // group, channels // group))
    plan.shard(weight, shard)
    plan.report.changed["gated_norm"] += 1


def _check_unhandled_hints(node: Node) -> None:
    """Ops outside this pass that ask to be sharded are refused by name."""
    if node.target in _HANDLED or not str(node.target).startswith("auto_deploy."):
        return
    args = _args(node)
    if args.get("tp_mode", "none") != "none" or args.get("shardable") or args.get("enable_sharding"):
        raise UnsupportedFeature(node.name, f"sharding hints of {node.target}", "run with world size 1")


def _ancestors_reach(start: Node, targets: set[Node]) -> bool:
    """Whether a node of ``targets`` feeds ``start`` without an ``all_reduce`` in between."""
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen or node.target == _ALL_REDUCE:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return False


def _check_reductions(gm: GraphModule, plan: ShardingPlan) -> None:
    """Every all_reduce sums a partial result, and every partial result is summed before the output."""
    for node in plan.all_reduces:
        if not _ancestors_reach(node.args[0], plan.partial):
            raise UnsupportedFeature(
                node.name, "all_reduce of a replicated tensor (no rowwise linear or sharded MoE feeds it)"
            )
    for node in plan.partial:
        seen, stack = set(), list(node.users)
        while stack:
            user = stack.pop()
            if user.op == "output":
                raise UnsupportedFeature(node.name, "partial sum reaches the output without an all_reduce")
            if user in seen or user.target == _ALL_REDUCE:
                continue
            seen.add(user)
            stack.extend(user.users)


def _selected(node: Node, shard_layers: Collection[str] | None) -> bool:
    """Whether ``node``'s ``layer_type`` is one to shard (``torch_attention`` has none: it counts as mha)."""
    if shard_layers is None or node.target not in _HANDLED:
        return True
    return _args(node).get("layer_type", "mha") in shard_layers


def plan_sharding(
    gm: GraphModule, rank: int, world_size: int, shard_layers: Collection[str] | None = None
) -> ShardingPlan:
    """Validate ``gm`` for ``world_size`` and compute rank ``rank``'s edits; ``gm`` is not changed.

    ``shard_layers`` (e.g. ``["mha", "mlp"]``) limits sharding to ops with those ``layer_type`` hints;
    the others, ``"unknown"`` included, stay replicated. ``None`` shards every hinted op.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ShardingError("world size", f"rank {rank} is not in [0, {world_size}) or world size < 1")
    plan = ShardingPlan(ShardingReport(rank, world_size))
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target in (_SSM, _DELTA, _CHANNEL_DELTA)
            and _selected(node, shard_layers)
        ):
            _check_mixer_heads(node, plan)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _selected(node, shard_layers):
            continue
        if node.target == _LINEAR:
            _plan_linear(gm, node, plan)
        elif node.target == _VIEW:
            _plan_view(node, plan)
        elif node.target == _SPLIT:
            _plan_split(node, plan)
        elif node.target == _ATTENTION:
            _plan_attention(gm, node, plan)
        elif node.target == _MOE:
            _plan_moe(gm, node, plan)
        elif node.target in (_MLA, _SPARSE_MLA):
            _plan_mla(gm, node, plan)
        elif node.target == _CONV:
            _plan_conv(gm, node, plan)
        elif node.target == _SSM:
            _plan_ssm(gm, node, plan)
        elif node.target == _DELTA:
            _plan_delta(gm, node, plan)
        elif node.target == _CHANNEL_DELTA:
            _plan_channel_delta(gm, node, plan)
        elif node.target == _RG_LRU:
            _plan_rg_lru(gm, node, plan)
        elif node.target == _GATED_NORM:
            _plan_gated_norm(gm, node, plan)
        elif node.target in _MULS:
            _plan_row_scale(gm, node, plan)
        elif node.target == _ALL_REDUCE:
            plan.all_reduces.append(node)
            plan.report.changed["all_reduce"] += 1
        else:
            _check_unhandled_hints(node)
    if world_size > 1 and plan.report.nodes_changed == 0:
        raise ShardingError(
            "model graph",
            "no sharding hints found (0 nodes changed)",
            "the model file must use torch_linear_simple with tp_mode, auto_deploy.view and all_reduce",
        )
    _check_reductions(gm, plan)
    return plan


def check_devices(world_size: int, device: torch.device) -> None:
    """Refuse more ranks than accelerators of ``device``'s type (CPU ranks are processes, not devices;
    a meta-device graph is placed later, on the rank's own device, which is checked then)."""
    if device.type in ("cpu", "meta"):
        return
    available = torch.accelerator.device_count() if torch.accelerator.is_available() else 0
    if world_size > available:
        raise ShardingError(
            "world size", f"{world_size} ranks but only {available} {device.type} device(s)", "lower it"
        )


@dumps_graph
def apply_sharding_hints(
    gm: GraphModule,
    rank: int,
    world_size: int,
    group_name: str | None = None,
    shard_layers: Collection[str] | None = None,
) -> ShardingReport:
    """Shard ``gm`` in place for rank ``rank`` of ``world_size``; see the module docstring.

    ``group_name`` defaults to the default process group's, which must then exist (the group itself is
    only used when the graph runs). ``shard_layers``: see :func:`plan_sharding`. Raises
    :class:`ShardingError` / :class:`UnsupportedFeature` before changing anything.
    """
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    check_devices(world_size, device)
    plan = plan_sharding(gm, rank, world_size, shard_layers)
    if world_size == 1:
        return ShardingReport(rank, world_size)  # validated; nothing to change
    if group_name is None:
        group_name = _default_group_name()
    _cut_parameters(gm, plan.report.params)
    for node, name, value in plan.new_args:
        _set_arg(node, name, value)
    _shift_expert_ids(gm, plan.expert_offsets)
    _insert_collectives(gm, plan.all_reduces, group_name)
    for node, slot, slots in plan.spanning_norms:
        replace_spanning_gated_norm(gm, node, slot, slots, group_name)
    gm.graph.eliminate_dead_code()
    drop_unread(gm, plan.report.dropped)
    gm.delete_all_unused_submodules()
    gm.recompile()
    _refresh_shapes(gm)
    log.info(
        "apply_sharding_hints: rank %d/%d, %d nodes processed", rank, world_size, plan.report.nodes_changed
    )
    return plan.report


def _default_group_name() -> str:
    if not torch.distributed.is_initialized():
        raise ShardingError(
            "process group", "world size > 1 needs torch.distributed initialised before sharding"
        )
    return torch.distributed.group.WORLD.group_name


def _cut_parameters(gm: GraphModule, shards: dict[str, ParamShard]) -> None:
    for name, shard in shards.items():
        module_path, _, attr = name.rpartition(".")
        module = gm.get_submodule(module_path)
        full = getattr(module, attr)
        local = shard.cut(full.detach())
        value = (
            torch.nn.Parameter(local, requires_grad=False) if isinstance(full, torch.nn.Parameter) else local
        )
        setattr(module, attr, value)


def _shift_expert_ids(gm: GraphModule, offsets: Sequence[tuple[Node, int]]) -> None:
    for node, offset in offsets:
        if offset == 0:
            continue
        selected = _args(node)["selected_experts"]
        with gm.graph.inserting_before(node):
            shifted = gm.graph.call_function(torch.ops.aten.sub.Scalar, (selected, offset))
        _set_arg(node, "selected_experts", shifted)


def _insert_collectives(gm: GraphModule, nodes: Sequence[Node], group_name: str) -> None:
    functional = torch.ops._c10d_functional
    for node in nodes:
        with gm.graph.inserting_after(node):
            reduced = gm.graph.call_function(functional.all_reduce.default, (node.args[0], "sum", group_name))
        with gm.graph.inserting_after(reduced):
            waited = gm.graph.call_function(functional.wait_tensor.default, (reduced,))
        node.replace_all_uses_with(waited)
        gm.graph.erase_node(node)


def _refresh_shapes(gm: GraphModule) -> None:
    """Recompute ``meta["val"]`` of every node with the export's fake mode and symbolic inputs."""
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = torch._guards.detect_fake_mode(inputs)
    if fake_mode is None or any(v is None for v in inputs):
        return
    try:
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
    except Exception as err:  # a shape mismatch anywhere in the rewritten graph
        raise ShardingError("sharded graph", f"shapes do not fit after sharding: {err}") from err


__all__ = [
    "ParamShard",
    "ShardingPlan",
    "ShardingError",
    "ShardingReport",
    "apply_sharding_hints",
    "check_devices",
    "plan_sharding",
]
