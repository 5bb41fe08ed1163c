"""``onboardlm viz``: one decoder layer as a hierarchical diagram (DOT; SVG/PNG through Graphviz)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from onboardlm.cli.common import (
    CUSTOM_MODEL_DIR_HELP,
    app,
    console,
    load_custom_model_dirs,
    reports_user_errors,
)


def _is_dump_file(source: str) -> bool:
    path = Path(source)
    return path.is_file() and path.suffix == ".txt"


@app.command("viz")
@reports_user_errors
def viz_command(
    source: Annotated[
        str,
        typer.Argument(
            help="A graph dump file (ONBOARDLM_DUMP_GRAPHS_DIR/NN_<transform>.txt: the graph after it) or a "
            "model as `run` names it (registry name, model dir, .gguf, cached hub id, model_type)."
        ),
    ],
    layer: Annotated[int, typer.Option("--layer", "-l", min=0, help="Decoder layer index.")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Output: .dot (DOT text), or .svg/.png/.pdf (DOT beside it)."),
    ],
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile", help="A torch.profiler chrome trace (JSON) of the graph: kernels and times per node."
        ),
    ] = None,
    cached: Annotated[
        bool, typer.Option("--cached", help="For a model: draw the graph after the KV-cache transform.")
    ] = False,
    custom_model_dir: Annotated[
        list[Path] | None, typer.Option("--custom-model-dir", help=CUSTOM_MODEL_DIR_HELP)
    ] = None,
) -> None:
    """Draw decoder layer N: one box per graph node (op, output shape, weights read, profiled kernels),
    nested in one cluster per module."""
    from onboardlm.debug.profile import attach_profile
    from onboardlm.debug.viz import (
        VizError,
        check_output,
        model_graph,
        nodes_of_dump,
        nodes_of_graph,
        render,
        select_layer,
        to_dot,
    )

    check_output(output)
    if _is_dump_file(source):
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise VizError(source, "not a text file", "pass a dump .txt file") from None
        nodes, types = nodes_of_dump(text, source), {}
        title = f"{Path(source).name}, layer {layer}"
    else:
        load_custom_model_dirs(custom_model_dir)
        with console.status(f"exporting {source} ..."):
            gm, title = model_graph(source, layer, cached=cached)
        nodes, types = nodes_of_graph(gm)
    profiled = ""
    if profile is not None:
        matched, total = attach_profile(nodes, profile)
        profiled = f"; profile: {matched} of {total} top-level trace ops matched to nodes"
    graph = select_layer(nodes, layer, types)
    dot_text = to_dot(graph, title)
    files, note = render(dot_text, output)
    edges = dot_text.count(" -> ")
    console.print(
        f"[green]wrote[/] {', '.join(str(f) for f in files)}: {graph.layer}, {len(graph.nodes)} nodes, "
        f"{len(graph.outside)} inputs from outside the layer, {edges} edges{profiled}",
        highlight=False,
        soft_wrap=True,
    )
    if note:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
