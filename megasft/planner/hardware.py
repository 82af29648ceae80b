"""Accelerators and clusters the planner models: memory, peak FLOP/s and link bandwidths.

Bandwidths are *achievable NCCL bus bandwidths* per GPU in one direction (what nccl-tests report
as busbw for large messages), not the marketing bidirectional numbers: e.g. H100 SXM NVLink4 is
900 GB/s bidirectional = 450 GB/s per direction, of which ring collectives reach about 360 GB/s;
one 400 Gb/s InfiniBand NDR NIC per GPU is 50 GB/s, about 40 GB/s achieved. Every number can be
overridden on the command line; treat the defaults as starting points, not measurements of your
cluster.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megasft.config import ConfigError

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    """Human-readable device name."""
    memory_gib: float
    """Usable device memory as nvidia-smi reports it (GiB)."""
    peak_tflops: float
    """Dense bf16 tensor-core peak (TFLOP/s), the denominator of MFU."""
    hbm_gbps: float
    """Device memory bandwidth (GB/s); bounds the memory-bound optimizer step."""
    intra_node_gbps: float
    """Achievable bus bandwidth of collectives inside a node (NVLink), GB/s per GPU."""
    inter_node_gbps: float
    """Achievable bus bandwidth of collectives across nodes (one NIC per GPU), GB/s per GPU."""


GPUS: dict[str, GpuSpec] = {
    # 81559 MiB usable; 989 TFLOP/s dense bf16 (SXM); 3.35 TB/s HBM3; NVLink4; 400G NDR per GPU.
    "h100-80gb": GpuSpec("H100 SXM 80GB", 79.6, 989.0, 3350.0, 360.0, 40.0),
    # Same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s.
    "h200-141gb": GpuSpec("H200 SXM 141GB", 140.4, 989.0, 4800.0, 360.0, 40.0),
    # PCIe H100: 756 TFLOP/s dense bf16, NVLink bridge pairs only, so collectives mostly go over PCIe.
    "h100-pcie-80gb": GpuSpec("H100 PCIe 80GB", 79.6, 756.0, 2000.0, 50.0, 20.0),
    # 312 TFLOP/s dense bf16; NVLink3 600 GB/s bidirectional; 200G HDR per GPU.
    "a100-80gb": GpuSpec("A100 SXM 80GB", 80.0, 312.0, 2039.0, 230.0, 20.0),
    "a100-40gb": GpuSpec("A100 SXM 40GB", 40.0, 312.0, 1555.0, 230.0, 20.0),
    # 2250 TFLOP/s dense bf16; NVLink5 1.8 TB/s bidirectional; 400G per GPU.
    "b200-180gb": GpuSpec("B200 180GB", 178.4, 2250.0, 8000.0, 720.0, 40.0),
    # CDNA3: 1307 TFLOP/s dense bf16; Infinity Fabric about 448 GB/s bidirectional per GPU.
    "mi300x-192gb": GpuSpec("MI300X 192GB", 191.5, 1307.0, 5300.0, 150.0, 40.0),
}


@dataclass(frozen=True)
class Cluster:
    nodes: int
    """Number of nodes."""
    gpus_per_node: int
    """Accelerators per node (one rank each)."""
    gpu: GpuSpec
    """The accelerator (with any command-line overrides applied)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def memory_bytes(self) -> float:
        return self.gpu.memory_gib * GIB

    def group_bandwidth(self, span: int) -> float:
        """Bus bandwidth (bytes/s) of a group whose ranks cover ``span`` consecutive global ranks.

        Groups of the TP-fastest layout are strided blocks; a group stays on NVLink only when the
        block it spans fits inside one node, otherwise its ring crosses the network (each GPU
        drives its own NIC, so concurrent groups do not share a link).
        """
        inside = span <= self.gpus_per_node
        return (self.gpu.intra_node_gbps if inside else self.gpu.inter_node_gbps) * 1e9


def make_cluster(nodes: int, gpus_per_node: int, gpu: str, *, memory_gib: float | None = None,
                 peak_tflops: float | None = None, intra_node_gbps: float | None = None,
                 inter_node_gbps: float | None = None) -> Cluster:
    """A Cluster of ``nodes`` x ``gpus_per_node`` GPUs of type ``gpu`` (a GPUS key); a non-None
    keyword replaces that number of the GPU's defaults (an unlisted GPU is its closest key plus
    overrides)."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown GPU {gpu!r}; known GPUs: {sorted(GPUS)} (for another device pick the "
                          "closest one and override memory, peak TFLOP/s and bandwidths)")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must both be >= 1")
    given = {"memory_gib": memory_gib, "peak_tflops": peak_tflops, "intra_node_gbps": intra_node_gbps,
             "inter_node_gbps": inter_node_gbps}
    spec = dataclasses.replace(GPUS[gpu], **{k: v for k, v in given.items() if v is not None})
    return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu=spec)
