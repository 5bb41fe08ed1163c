"""Which of the runtime's graph transforms moves the logits: turn them on one at a time.

The lean model's eager logits are the reference. Stage by stage: the exported graph, then the cached
graph (KV cache: a prefill of the first half of the input, then one decode step per remaining token),
then with each transform of :data:`onboardlm.debug.stages.STAGES` turned on in turn (each stage keeps
the earlier ones on, applied in the runtime's order), then all of them on a graph sharded over two
ranks (gloo, two worker processes). The first stage whose logits' RMSE ratio passes the tolerance is
the transform to look at.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onboardlm.debug.stages import STAGES, Stage, cached_logits
from onboardlm.errors import OnboardlmError
from onboardlm.export import causal_lm_dynamic_shapes, torch_export_to_gm
from onboardlm.testing.metrics import rmse_ratio
from onboardlm.transforms.sharding import ShardingError, plan_sharding

SHARD_WORLD_SIZE = 2
SHARD_TIMEOUT_S = 600


@dataclass(frozen=True)
class StageResult:
    """The logits of one stage against the eager lean model's."""

    name: str
    description: str
    ratio: float | None
    top1_agreement: float | None
    past_tolerance: bool
    note: str = ""


@dataclass(frozen=True)
class ShardJob:
    """What the sharding workers need to rebuild the lean model: how ``run`` names it, and its weights."""

    model: str | None
    model_kwargs: dict[str, Any] | None
    dtype: str
    custom_model_dirs: tuple[str, ...] = ()


def _agreement(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.argmax(-1) == expected.argmax(-1)).float().mean())


def _result(
    stage: str, description: str, logits: torch.Tensor, expected: torch.Tensor, tol: float
) -> StageResult:
    ratio = rmse_ratio(logits, expected)
    return StageResult(stage, description, ratio, _agreement(logits, expected), not ratio <= tol)


def export_lean(lean: nn.Module) -> torch.fx.GraphModule:
    """Export ``lean`` as the runtime does (dynamic batch and sequence)."""
    device = next(lean.parameters()).device
    input_ids = torch.zeros(2, 8, dtype=torch.long, device=device)
    position_ids = torch.arange(8, device=device).expand(2, 8)
    return torch_export_to_gm(
        lean,
        kwargs={"input_ids": input_ids, "position_ids": position_ids},
        dynamic_shapes=causal_lm_dynamic_shapes(),
    )


def bisect_transforms(
    lean: nn.Module,
    input_ids: torch.Tensor,
    tolerance: float,
    *,
    stages: Sequence[Stage] = STAGES,
    shard_job: ShardJob | None = None,
) -> list[StageResult]:
    """One result per stage, in the order they were turned on (see the module doc). Without
    ``shard_job`` the sharding stage is skipped."""
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        eager = lean(input_ids=input_ids, position_ids=positions).logits.float()
    prompt_len = max(1, input_ids.shape[1] // 2)
    expected = eager[:, prompt_len - 1 :].transpose(0, 1)  # [positions, b, vocab] as cached_logits
    exported = export_lean(lean)
    with torch.no_grad():
        graph_logits = exported(input_ids=input_ids, position_ids=positions)
    graph_logits = (graph_logits.logits if hasattr(graph_logits, "logits") else graph_logits[0]).float()
    results = [_result("export", "torch.export, no transform", graph_logits, eager, tolerance)]
    kv = cached_logits(exported, [], input_ids, prompt_len)
    what = f"cached attention: prefill {prompt_len}, decode {input_ids.shape[1] - prompt_len}"
    results.append(_result("kv_cache", what, kv, expected, tolerance))
    for index, stage in enumerate(stages):
        logits = cached_logits(exported, stages[: index + 1], input_ids, prompt_len)
        results.append(_result(stage.name, stage.description, logits, expected, tolerance))
    description = f"all above, tensor parallel over {SHARD_WORLD_SIZE} ranks (gloo)"
    unshardable = _unshardable(exported)
    if shard_job is None:
        results.append(StageResult("sharding", description, None, None, False, "skipped"))
    elif unshardable is not None:
        results.append(StageResult("sharding", description, None, None, False, f"skipped: {unshardable}"))
    else:
        logits = run_sharded(lean, shard_job, input_ids, prompt_len, [stage.name for stage in stages])
        results.append(_result("sharding", description, logits, expected, tolerance))
    return results


def _unshardable(exported: torch.fx.GraphModule) -> str | None:
    """Why the graph cannot be sharded over :data:`SHARD_WORLD_SIZE` ranks (e.g. 3 KV heads), or None."""
    try:
        plan_sharding(exported, 0, SHARD_WORLD_SIZE)
    except ShardingError as err:
        return err.problem
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_sharded(
    lean: nn.Module, job: ShardJob, input_ids: torch.Tensor, prompt_len: int, stage_names: list[str]
) -> torch.Tensor:
    """The cached logits of ``lean`` sharded over two CPU ranks: two worker processes
    (:mod:`onboardlm.debug.shard_worker`) rebuild it, load its weights, shard, run; rank 0's logits."""
    with tempfile.TemporaryDirectory(prefix="onboardlm-shard-") as folder:
        work = Path(folder)
        torch.save({k: v.detach().cpu() for k, v in lean.state_dict().items()}, work / "weights.pt")
        torch.save(input_ids.cpu(), work / "input_ids.pt")
        spec = {
            "model": job.model,
            "model_kwargs": job.model_kwargs,
            "dtype": job.dtype,
            "custom_model_dirs": list(job.custom_model_dirs),
            "prompt_len": prompt_len,
            "stages": stage_names,
        }
        (work / "job.json").write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        env["WORLD_SIZE"] = str(SHARD_WORLD_SIZE)
        env["PYTHONPATH"] = os.pathsep.join([*sys.path[1:], env.get("PYTHONPATH", "")])
        procs = []
        for rank in range(SHARD_WORLD_SIZE):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            cmd = [sys.executable, "-m", "onboardlm.debug.shard_worker", str(work)]
            procs.append(
                subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        outputs = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=SHARD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise OnboardlmError("sharding", f"the rank processes ran past {SHARD_TIMEOUT_S} s") from None
            outputs.append(out.decode(errors="replace"))
        failed = [
            (rank, out)
            for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True))
            if proc.returncode
        ]
        if failed:
            rank, out = failed[0]
            last = (out.strip().splitlines() or ["no output"])[-1]
            raise OnboardlmError(f"sharding rank {rank}", f"the worker failed: {last}")
        return torch.load(work / "logits.pt")
