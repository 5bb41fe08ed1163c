"""One rank of :func:`onboardlm.debug.transform_bisect.run_sharded`: ``python -m onboardlm.debug.shard_worker DIR``.

Reads ``DIR/job.json``, rebuilds the lean model as ``onboardlm run`` names it, loads ``DIR/weights.pt``,
exports it, shards it for this rank (torch.distributed env variables, gloo), turns the named stages on and
runs the cached graph on ``DIR/input_ids.pt``; rank 0 writes ``DIR/logits.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(folder: Path) -> None:
    from onboardlm.debug.stages import cached_logits, stage_by_name
    from onboardlm.debug.transform_bisect import export_lean
    from onboardlm.models.factory import AutoModelForCausalLMFactory
    from onboardlm.models.plugins import load_custom_models
    from onboardlm.runtime.distributed import RankInfo
    from onboardlm.runtime.runner import model_location
    from onboardlm.runtime.tensor_parallel import close_process_group, graph_sharder

    job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    load_custom_models([Path(d) for d in job["custom_model_dirs"]])
    factory = AutoModelForCausalLMFactory(model_location(job["model"]), job["model_kwargs"])
    lean = factory.build_model("cpu", getattr(torch, job["dtype"]), init_weights=False)
    lean.load_state_dict(torch.load(folder / "weights.pt"), strict=True)
    info = RankInfo.from_env()
    shard = graph_sharder(info, torch.device("cpu"))
    input_ids = torch.load(folder / "input_ids.pt")
    try:
        logits = cached_logits(
            export_lean(lean.eval()), stage_by_name(job["stages"]), input_ids, job["prompt_len"], shard=shard
        )
    finally:
        close_process_group()
    if info.rank == 0:
        torch.save(logits, folder / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
