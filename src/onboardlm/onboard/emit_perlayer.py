"""Emit per-layer inputs (``PerLayerInputSpec``): the model computes them, every decoder layer mixes
its slice in after attention and feed-forward. The config's width field switches it all on (0: none,
the file keeps both ways)."""

from __future__ import annotations

import re

from onboardlm.errors import UnsupportedFeature
from onboardlm.onboard.spec import ArchitectureSpec, MLPSpec
from onboardlm.onboard.spec_perlayer import PerLayerInputSpec

__all__ = [
    "layer_forward_lines",
    "layer_init_lines",
    "layer_method",
    "model_forward_lines",
    "model_init_lines",
    "model_method",
]

_HINT = "a template for per-layer inputs beside this construct"
#: The model's per-layer inputs and the slice of the current layer, in the lean forward.
INPUTS, SLICE = "per_layer_inputs", "per_layer_input"


def _width(per_layer: PerLayerInputSpec) -> str:
    return f"config.{per_layer.width}"


def layer_init_lines(spec: ArchitectureSpec, norm: str) -> list[str]:
    """Decoder-layer constructor lines: the gate, up projection, norm and activation (``norm``: the
    constructor of the layers' norm class at the hidden width)."""
    per_layer = spec.per_layer_input
    if per_layer is None:
        return []
    ff = spec.feed_forward
    taken = {spec.attention.attr, getattr(ff, "attr", "")}
    if isinstance(ff, MLPSpec) and ff.inline:
        taken |= {ff.act_attr, ff.inputs[0].name, ff.down.name}
    if taken & {per_layer.act_attr, per_layer.gate, per_layer.up, per_layer.norm}:
        raise UnsupportedFeature(spec.decoder_class, "per-layer input modules named as the blocks", _HINT)
    width = _width(per_layer)
    return [
        "# per-layer inputs (0: none)",
        f"if {width}:",
        f"    self.{per_layer.act_attr} = ACT2FN[{per_layer.act}]",
        f"    self.{per_layer.gate} = nn.Linear(config.hidden_size, {width}, bias=False)",
        f"    self.{per_layer.up} = nn.Linear({width}, config.hidden_size, bias=False)",
        f"    self.{per_layer.norm} = {norm}",
    ]


def layer_forward_lines(lines: list[str], spec: ArchitectureSpec) -> list[str]:
    """``lines`` with each ``return x`` mixing the layer's per-layer input into ``x`` first."""
    if spec.per_layer_input is None:
        return lines
    mixed = []
    for line in lines:
        body = line.lstrip()
        if not body.startswith("return "):
            mixed.append(line)
            continue
        indent = line[: len(line) - len(body)]
        mixed += [
            f"{indent}hidden_states = {body.removeprefix('return ')}",
            f"{indent}if {SLICE} is not None:",
            f"{indent}    hidden_states = hidden_states + self.mix_per_layer_input(hidden_states, {SLICE})",
            f"{indent}return hidden_states",
        ]
    return mixed


def model_init_lines(spec: ArchitectureSpec, norm: str) -> list[str]:
    """Model constructor lines: the per-layer table, the projection and its norm (``norm``: the
    constructor of the layers' norm class at the per-layer width)."""
    per_layer = spec.per_layer_input
    if per_layer is None:
        return []
    embedding = spec.embedding
    if embedding.project_in or embedding.positions is not None or embedding.norm or embedding.wrapper:
        raise UnsupportedFeature(
            f"{spec.stack_path}.{per_layer.projection}",
            "per-layer inputs beside embeddings that are projected, positioned or normalised",
            _HINT,
        )
    width = _width(per_layer)
    columns = f"config.num_hidden_layers * {width}"
    padding = ", config.pad_token_id" if embedding.padding_idx else ""
    if per_layer.table_class:
        table = (
            f"{per_layer.table_class}({per_layer.rows}, {columns}{padding}, {per_layer.table_scale or 1.0})"
        )
    else:
        table = f"nn.Embedding({per_layer.rows}, {columns}{padding})"
    return [
        "# per-layer inputs: each layer's own embedding of every token (0: none)",
        f"if {width}:",
        f"    self.{per_layer.table} = {table}",
        f"    self.{per_layer.projection} = nn.Linear(config.hidden_size, {columns}, bias=False)",
        f"    self.{per_layer.projection_norm} = {norm}",
        "    self._register_load_state_dict_pre_hook(self._keep_own_layers_columns)",
    ]


def model_forward_lines(forward: list[str], spec: ArchitectureSpec) -> list[str]:
    """``forward`` computing the per-layer inputs before the layers and giving each layer its slice."""
    per_layer = spec.per_layer_input
    if per_layer is None:
        return forward
    layers = f"self.{spec.layers_attr}"
    loops = [i for i, line in enumerate(forward) if line.startswith("for ") and layers in line]
    if len(loops) != 1 or not forward[loops[0] + 1].startswith("    hidden_states = layer("):
        raise UnsupportedFeature(spec.decoder_class, "per-layer inputs beside this layer loop", _HINT)
    start = loops[0]
    loop = re.fullmatch(r"for (.+) in (.+):", forward[start])
    if loop is None:
        raise UnsupportedFeature(spec.decoder_class, "per-layer inputs beside this layer loop", _HINT)
    targets, iterable = loop.groups()
    if not iterable.startswith("enumerate("):
        targets = f"index, ({targets})" if "," in targets else f"index, {targets}"
        iterable = f"enumerate({iterable})"
    index = targets.split(",")[0]
    call = forward[start + 1]
    return [
        *forward[:start],
        f"{INPUTS} = self.{INPUTS}(input_ids, inputs_embeds) if self.config.{per_layer.width} else None",
        f"for {targets} in {iterable}:",
        f"    {SLICE} = None if {INPUTS} is None else {INPUTS}[:, :, {index}]",
        call[:-1] + f", {SLICE})",
        *forward[start + 2 :],
    ]


def layer_method(spec: ArchitectureSpec) -> str:
    per_layer = spec.per_layer_input
    if per_layer is None:
        return ""
    return f'''    def mix_per_layer_input(self, hidden_states: torch.Tensor, {SLICE}: torch.Tensor) -> torch.Tensor:
        """The layer's per-layer input, gated by the hidden states and projected back to their width."""
        linear = torch.ops.auto_deploy.torch_linear_simple
        gate = self.{per_layer.act_attr}(linear(hidden_states, self.{per_layer.gate}.weight, None))
        return self.{per_layer.norm}(linear(gate * {SLICE}, self.{per_layer.up}.weight, None))
'''


def model_method(spec: ArchitectureSpec) -> str:
    per_layer = spec.per_layer_input
    if per_layer is None:
        return ""
    tokens = f"self.{per_layer.table}(input_ids).reshape(shape)"
    if per_layer.table_scale and not per_layer.table_class:
        tokens += f" * {per_layer.table_scale}"
    projected = f"(projected * {per_layer.projection_scale})" if per_layer.projection_scale else "projected"
    total = "projected + tokens"
    if per_layer.combine_scale:
        total = f"({total}) * {per_layer.combine_scale}"
    return f'''    def {INPUTS}(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Every layer's own input per token, ``[B, S, num_hidden_layers, config.{per_layer.width}]``:
        its columns of the per-layer embedding table plus its slice of the normalised projection of
        the input embeddings."""
        if input_ids is None:
            raise ValueError("per-layer inputs embed the token ids: pass input_ids")
        config = self.config
        shape = (*inputs_embeds.shape[:-1], config.num_hidden_layers, config.{per_layer.width})
        tokens = {tokens}
        projected = torch.ops.auto_deploy.torch_linear_simple(inputs_embeds, self.{per_layer.projection}.weight, None)
        projected = self.{per_layer.projection_norm}({projected}.reshape(shape))
        return {total}

    def _keep_own_layers_columns(self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
        """Load hook: of a checkpoint with more layers than this model (a run with fewer
        num_hidden_layers), the first layers' columns of the per-layer table and projection."""
        columns = self.config.num_hidden_layers * self.config.{per_layer.width}
        for name, dim in (("{per_layer.table}", 1), ("{per_layer.projection}", 0)):
            key = f"{{prefix}}{{name}}.weight"
            if key in state_dict and state_dict[key].shape[dim] > columns:
                state_dict[key] = state_dict[key].narrow(dim, 0, columns)
'''
