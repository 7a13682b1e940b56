"""Accelerators ``jaxpost plan`` knows: memory per chip and bf16 dense peak FLOP/s per chip.

Sources (per chip, dense bf16, no sparsity):

* NVIDIA H100 SXM5: 80 GB HBM3, 989 TFLOP/s bf16 dense (the datasheet's
  1,979 TFLOP/s is "with sparsity"; half of it is dense).
  https://www.nvidia.com/en-us/data-center/h100/
* NVIDIA H200 SXM: 141 GB HBM3e, 989 TFLOP/s bf16 dense (same compute as
  H100 SXM; 1,979 with sparsity). https://www.nvidia.com/en-us/data-center/h200/
* Google TPU v5e: 16 GB HBM2, 197 TFLOP/s bf16. https://cloud.google.com/tpu/docs/v5e
* Google TPU v5p: 95 GB HBM2e, 459 TFLOP/s bf16. https://cloud.google.com/tpu/docs/v5p
* Google TPU v4: 32 GB HBM2, 275 TFLOP/s bf16. https://cloud.google.com/tpu/docs/v4
* Google TPU v6e (Trillium): 32 GB HBM, 918 TFLOP/s bf16. https://cloud.google.com/tpu/docs/v6e

Memory is taken as the published number in GiB (2**30 bytes), which is how
the chips report it (an H100 shows 81,559 MiB; an H200 143,771 MiB). On GPUs
JAX preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of it;
set that to e.g. 0.95 to use the memory the plan counts on.
"""

from __future__ import annotations

import dataclasses

from jaxpost.errors import UserError

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    name: str
    memory_bytes: int
    peak_flops: float  # bf16 dense FLOP/s per chip
    gpu: bool = False

    @property
    def label(self) -> str:
        mem = self.memory_bytes / GiB
        mem = f"{mem:.0f} GiB" if mem >= 1 else f"{self.memory_bytes / 2 ** 20:.2f} MiB"
        return f"{self.name} ({mem}, {self.peak_flops / 1e12:.0f} TFLOP/s bf16)"


DEVICE_KINDS: dict[str, DeviceKind] = {
    "h100": DeviceKind("H100", 80 * GiB, 989e12, gpu=True),
    "h200": DeviceKind("H200", 141 * GiB, 989e12, gpu=True),
    "v5e": DeviceKind("TPU v5e", 16 * GiB, 197e12),
    "v5p": DeviceKind("TPU v5p", 95 * GiB, 459e12),
    "v4": DeviceKind("TPU v4", 32 * GiB, 275e12),
    "v6e": DeviceKind("TPU v6e", 32 * GiB, 918e12),
}

_ALIASES = {"tpu_v5e": "v5e", "v5litepod": "v5e", "tpu_v5p": "v5p", "tpu_v4": "v4", "tpu_v6e": "v6e",
            "trillium": "v6e", "h100_80gb": "h100", "nvidia_h100": "h100", "nvidia_h200": "h200"}


def device_kind(name: str, memory_gb: float | None = None) -> DeviceKind:
    """The :class:`DeviceKind` named ``name`` (case and ``-`` insensitive); ``memory_gb`` overrides its memory."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in DEVICE_KINDS:
        raise UserError(f"--device_kind={name!r} is unknown; choose one of {', '.join(DEVICE_KINDS)}")
    kind = DEVICE_KINDS[key]
    if memory_gb is not None:
        if memory_gb <= 0:
            raise UserError(f"--device_memory_gb must be > 0, got {memory_gb}")
        kind = dataclasses.replace(kind, name=f"{kind.name} (memory overridden)",
                                   memory_bytes=int(memory_gb * GiB))
    return kind
