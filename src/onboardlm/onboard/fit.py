"""Phase 0b: how big the model is and whether it fits the memory of this machine.

The parameter count comes from building the transformers model on the ``meta`` device (no memory,
no weights), so it is exact for every architecture, tied embeddings counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from onboardlm.models.build_errors import unbuildable
from onboardlm.registry.editor import world_size_for_params

#: Bytes per parameter of the dtypes a run may use.
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
#: Activations, KV cache and allocator slack on top of the weights when judging "fits".
HEADROOM = 1.2


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # "cuda:0" or "host"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class FitReport:
    """Size of the model and whether its bf16 weights fit on one device of this machine."""

    parameters: int
    bytes_per_dtype: dict[str, int]
    world_size: int
    devices: list[DeviceMemory] = field(default_factory=list)

    @property
    def run_device(self) -> DeviceMemory | None:
        """The device a run would use: the GPU with most free memory, else the host."""
        gpus = [d for d in self.devices if d.name != "host"]
        pool = gpus or [d for d in self.devices if d.name == "host"]
        return max(pool, key=lambda d: d.free_bytes, default=None)

    @property
    def fits(self) -> bool:
        device = self.run_device
        needed = self.bytes_per_dtype["bfloat16"] * HEADROOM
        return device is not None and needed <= device.free_bytes


def fit(config: PretrainedConfig) -> FitReport:
    """Count parameters on a meta-device build and read free memory of the GPUs and the host."""
    parameters = count_parameters(config)
    return FitReport(
        parameters=parameters,
        bytes_per_dtype={dtype: parameters * size for dtype, size in BYTES_PER_PARAM.items()},
        world_size=world_size_for_params(parameters),
        devices=[*gpu_memory(), host_memory()],
    )


def count_parameters(config: PretrainedConfig) -> int:
    """Exact parameter count of the transformers causal LM for ``config``, without allocating;
    :class:`UnsupportedFeature` (module and unset field) when transformers cannot build it."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # transformers raises anything from a config it cannot build
        raise unbuildable(config, err) from err
    return sum(p.numel() for p in model.parameters())


def gpu_memory() -> list[DeviceMemory]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        found.append(DeviceMemory(f"cuda:{index}", free, total))
    return found


def host_memory() -> DeviceMemory:
    """Available and total host memory, from psutil (Linux, macOS and Windows alike)."""
    memory = psutil.virtual_memory()
    return DeviceMemory("host", memory.available, memory.total)
