"""FakeRunPod's GPU catalog: the GPU types, their stock and prices per cloud and data center, the catalog routes'
availability filters, and where a new pod's GPUs come from (`Catalog`, a mixin of `FakeRunPod`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, Query

from ow_prefect.testing.fake_runpod.spec import Problem

if TYPE_CHECKING:
    from ow_prefect.testing.fake_runpod.pods import FakePod

CAPACITY_DETAIL = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
HOST_CUDA_VERSION = "12.8"
DEFAULT_DATA_CENTER = "US-TX-3"
CLOUDS = ("SECURE", "COMMUNITY")
AVAILABILITY_LEVELS = ("NONE", "LOW", "MEDIUM", "HIGH")
MAX_GPUS_PER_POD = {"secure": 8, "community": 4}
CPU_PRICE_PER_VCPU = 0.03

# GPU id -> (display name, memory in GB, serverless pool), from RunPod's GPU types page.
GPU_TYPES: dict[str, tuple[str, int, str | None]] = {
    "AMD Instinct MI300X OAM": ("MI300X", 192, None),
    "NVIDIA A100 80GB PCIe": ("A100 PCIe", 80, "AMPERE_80"),
    "NVIDIA A100-SXM4-80GB": ("A100 SXM", 80, "AMPERE_80"),
    "NVIDIA A30": ("A30", 24, None),
    "NVIDIA A40": ("A40", 48, "AMPERE_48"),
    "NVIDIA B200": ("B200", 180, None),
    "NVIDIA B300 SXM6 AC": ("B300", 288, None),
    "NVIDIA GeForce RTX 3070": ("RTX 3070", 8, None),
    "NVIDIA GeForce RTX 3080": ("RTX 3080", 10, None),
    "NVIDIA GeForce RTX 3080 Ti": ("RTX 3080 Ti", 12, None),
    "NVIDIA GeForce RTX 3090": ("RTX 3090", 24, "AMPERE_24"),
    "NVIDIA GeForce RTX 3090 Ti": ("RTX 3090 Ti", 24, None),
    "NVIDIA GeForce RTX 4070 Ti": ("RTX 4070 Ti", 12, None),
    "NVIDIA GeForce RTX 4080": ("RTX 4080", 16, None),
    "NVIDIA GeForce RTX 4080 SUPER": ("RTX 4080 SUPER", 16, None),
    "NVIDIA GeForce RTX 4090": ("RTX 4090", 24, "ADA_24"),
    "NVIDIA GeForce RTX 5080": ("RTX 5080", 16, None),
    "NVIDIA GeForce RTX 5090": ("RTX 5090", 32, None),
    "NVIDIA H100 80GB HBM3": ("H100 SXM", 80, "ADA_80_PRO"),
    "NVIDIA H100 NVL": ("H100 NVL", 94, None),
    "NVIDIA H100 PCIe": ("H100 PCIe", 80, "ADA_80_PRO"),
    "NVIDIA H200": ("H200 SXM", 141, "HOPPER_141"),
    "NVIDIA H200 NVL": ("NVIDIA H200 NVL", 143, None),
    "NVIDIA L4": ("L4", 24, "AMPERE_24"),
    "NVIDIA L40": ("L40", 48, "ADA_48_PRO"),
    "NVIDIA L40S": ("L40S", 48, "ADA_48_PRO"),
    "NVIDIA RTX 2000 Ada Generation": ("RTX 2000 Ada", 16, "AMPERE_16"),
    "NVIDIA RTX 4000 Ada Generation": ("RTX 4000 Ada", 20, "AMPERE_16"),
    "NVIDIA RTX 4000 SFF Ada Generation": ("RTX 4000 Ada SFF", 20, None),
    "NVIDIA RTX 5000 Ada Generation": ("RTX 5000 Ada", 32, None),
    "NVIDIA RTX 6000 Ada Generation": ("RTX 6000 Ada", 48, "ADA_48_PRO"),
    "NVIDIA RTX A2000": ("RTX A2000", 6, None),
    "NVIDIA RTX A4000": ("RTX A4000", 16, "AMPERE_16"),
    "NVIDIA RTX A4500": ("RTX A4500", 20, "AMPERE_16"),
    "NVIDIA RTX A5000": ("RTX A5000", 24, "AMPERE_24"),
    "NVIDIA RTX A6000": ("RTX A6000", 48, "AMPERE_48"),
    "NVIDIA RTX PRO 4500 Blackwell": ("RTX PRO 4500", 32, None),
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition": ("RTX PRO 6000 MaxQ", 96, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition MIG 1g.24gb": ("PRO 6000 MIG 24GB", 24, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition MIG 2g.48gb": ("PRO 6000 MIG 48GB", 48, None),
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": ("RTX PRO 6000", 96, None),
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": ("RTX PRO 6000 WK", 96, None),
    "Tesla V100-PCIE-16GB": ("Tesla V100", 16, None),
    "Tesla V100-SXM2-16GB": ("V100 SXM2", 16, None),
    "Tesla V100-SXM2-32GB": ("V100 SXM2 32GB", 32, None),
}
DATA_CENTER_NAMES = {"US-TX-3": "US Texas 3", "US-KS-2": "US Kansas 2", "EU-RO-1": "Europe Romania 1"}
# (GPU id, free units, cloud, data center, USD per GPU-hour): the stock a fresh fake starts with.
DEFAULT_STOCK = [
    ("NVIDIA GeForce RTX 4090", 4, "SECURE", "US-TX-3", 0.59),
    ("NVIDIA GeForce RTX 4090", 4, "COMMUNITY", "EU-RO-1", 0.34),
    ("NVIDIA RTX A6000", 4, "SECURE", "US-TX-3", 0.49),
    ("NVIDIA RTX A6000", 3, "COMMUNITY", "EU-RO-1", 0.33),
    ("NVIDIA A100 80GB PCIe", 4, "SECURE", "US-TX-3", 1.64),
    ("NVIDIA A100 80GB PCIe", 2, "COMMUNITY", "EU-RO-1", 1.19),
    ("NVIDIA H100 80GB HBM3", 8, "SECURE", "US-TX-3", 2.69),
    ("NVIDIA H100 80GB HBM3", 2, "COMMUNITY", "EU-RO-1", 1.99),
]


@dataclass
class StockEntry:
    """Free GPUs of one type in one cloud and data center, and what one of them costs per hour."""

    count: int
    price_per_hour: float


@dataclass
class AvailabilityFilters:
    """The catalog's `include=AVAILABILITY` query, checked."""

    products: list[str]
    count: int
    cloud: str
    cuda_versions: list[str]
    min_cuda_version: str | None


def _availability_filters(
    include: str | None = None,
    product: str | None = None,
    count: Annotated[int | None, Query(ge=1)] = None,
    cloud: Literal["SECURE", "COMMUNITY"] | None = None,
    countryCodes: str | None = None,  # noqa: N803 (the spec's parameter names)
    cudaVersions: str | None = None,  # noqa: N803
    minCudaVersion: Annotated[str | None, Query(pattern=r"^\d+(\.\d+)?$")] = None,  # noqa: N803
) -> AvailabilityFilters | None:
    """None without `include`; RunPod's 400s for filters that need `include=AVAILABILITY` or `product`."""
    includes, products, cuda_versions = _csv(include), _csv(product), _csv(cudaVersions)
    _check_enum("include", includes, ["AVAILABILITY"])
    _check_enum("product", products, ["POD", "CLUSTER", "SERVERLESS"])
    if not includes:
        given = {"product": product, "count": count, "cloud": cloud, "cudaVersions": cudaVersions}
        given |= {"minCudaVersion": minCudaVersion, "countryCodes": countryCodes}
        misplaced = [name for name, value in given.items() if value is not None]
        if misplaced:
            raise Problem(400, f"{', '.join(misplaced)}: valid only with include=AVAILABILITY")
        return None
    if not products:
        raise Problem(400, "include=AVAILABILITY requires product (POD, CLUSTER or SERVERLESS)")
    if cuda_versions and minCudaVersion:
        raise Problem(400, "cudaVersions and minCudaVersion are mutually exclusive")
    if any(not re.fullmatch(r"\d+\.\d+", version) for version in cuda_versions):
        raise Problem(422, f"cudaVersions must be major.minor versions, got {cudaVersions!r}")
    if countryCodes is not None:
        raise Problem(501, "the countryCodes filter is not implemented by FakeRunPod")
    return AvailabilityFilters(products, count or 1, cloud or "SECURE", cuda_versions, minCudaVersion)


def _csv(value: str | None) -> list[str]:
    return [item for item in (value or "").split(",") if item]


def _check_enum(name: str, values: list[str], allowed: list[str]) -> None:
    for value in values:
        if value not in allowed:
            raise Problem(422, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


CatalogFilters = Annotated[AvailabilityFilters | None, Depends(_availability_filters)]


class Catalog:
    """The catalog routes and the stock a pod takes and gives back (a mixin of `FakeRunPod`: `stock`, `_lock`)."""

    def _list_gpu_types(self, filters: AvailabilityFilters | None) -> dict[str, Any]:
        with self._lock:
            return {"gpus": [self._gpu_type_json(gpu_id, filters) for gpu_id in GPU_TYPES]}

    def _get_gpu_type(self, gpu_id: str, filters: AvailabilityFilters | None) -> dict[str, Any]:
        if gpu_id not in GPU_TYPES:
            raise Problem(404, f"GPU type {gpu_id!r} not found")
        with self._lock:
            return self._gpu_type_json(gpu_id, filters)

    def _gpu_type_json(self, gpu_id: str, filters: AvailabilityFilters | None) -> dict[str, Any]:
        name, memory, pool = GPU_TYPES[gpu_id]
        prices = {
            cloud: [entry.price_per_hour for key, entry in self.stock.items() if key[:2] == (gpu_id, cloud)]
            for cloud in CLOUDS
        }
        body = {
            "id": gpu_id,
            "name": name,
            "pool": pool,
            "manufacturer": "AMD" if gpu_id.startswith("AMD") else "NVIDIA",
            "memory": memory,
            "secure": bool(prices["SECURE"]),
            "community": bool(prices["COMMUNITY"]),
            "price": {cloud.lower(): min(prices[cloud], default=_list_price(gpu_id, cloud)) for cloud in CLOUDS},
            "maxCount": MAX_GPUS_PER_POD,
        }
        return body | (self._availability_json(gpu_id, filters) if filters else {})

    def _availability_json(self, gpu_id: str, filters: AvailabilityFilters) -> dict[str, Any]:
        cuda_ok = _cuda_accepted(filters.cuda_versions, filters.min_cuda_version)
        in_stock = cuda_ok and "POD" in filters.products  # the fake's stock is pod stock only
        levels = {
            key[2]: _availability_level(entry.count if in_stock else 0, filters.count)
            for key, entry in self.stock.items()
            if key[:2] == (gpu_id, filters.cloud)
        }
        offered = {data_center: level for data_center, level in levels.items() if level != "NONE"}
        body: dict[str, Any] = {"availability": max(offered.values(), key=AVAILABILITY_LEVELS.index, default="NONE")}
        if offered:
            body["dataCenters"] = [
                {"id": data_center, "name": DATA_CENTER_NAMES.get(data_center, data_center), "availability": level}
                for data_center, level in offered.items()
            ]
        if levels and cuda_ok:
            body["cudaVersions"] = [{"version": HOST_CUDA_VERSION, "available": bool(offered)}]
        return body

    def _place(self, body: dict[str, Any]) -> tuple[str, float, tuple[str, str, str] | None]:
        """Pick where the pod runs and take its GPUs from stock: (data center, USD per hour, stock key)."""
        preferred = body.get("dataCenterIds") or []
        if "cpu" in body:
            return (preferred or [DEFAULT_DATA_CENTER])[0], CPU_PRICE_PER_VCPU * body["cpu"]["vcpuCount"], None
        preferred = self._volume_data_center(body, preferred)
        gpu = body["gpu"]
        gpu_id, count, cloud = gpu["id"], gpu.get("count", 1), body.get("cloud", "SECURE")
        if gpu_id not in GPU_TYPES:
            raise Problem(400, f"unknown GPU type id {gpu_id!r}; list valid ids with GET /v2/catalog/gpus")
        if not _cuda_accepted(gpu.get("allowedCudaVersions"), gpu.get("minCudaVersion")):
            raise Problem(400, CAPACITY_DETAIL)
        candidates = [
            key for key in self.stock if key[:2] == (gpu_id, cloud) and (not preferred or key[2] in preferred)
        ]
        candidates.sort(key=lambda key: preferred.index(key[2]) if preferred else 0)
        for key in candidates:
            if self.stock[key].count >= count:
                self.stock[key].count -= count
                return key[2], round(self.stock[key].price_per_hour * count, 4), key
        raise Problem(400, CAPACITY_DETAIL)

    def _release_stock(self, pod: FakePod) -> None:
        if pod.holds_stock and pod.stock_key in self.stock:  # a test may have removed its data center's entry
            self.stock[pod.stock_key].count += pod.gpu["count"]
        pod.holds_stock = False

    def _acquire_stock(self, pod: FakePod) -> None:
        """Take a stopped pod's GPUs back from its data center, as RunPod does when it is started again."""
        if pod.stock_key:
            entry = self.stock[pod.stock_key]
            if entry.count < pod.gpu["count"]:
                raise Problem(400, CAPACITY_DETAIL)
            entry.count -= pod.gpu["count"]
        pod.holds_stock = True


def _list_price(gpu_id: str, cloud: str) -> float:
    """A plausible price for a GPU nobody priced: about 2.5 cents per GB of memory, 30% less on community."""
    secure = 0.025 * GPU_TYPES[gpu_id][1]
    return round(secure if cloud == "SECURE" else 0.7 * secure, 2)


def _availability_level(free_gpus: int, gpus_per_pod: int) -> str:
    pods_that_fit = free_gpus // gpus_per_pod
    if pods_that_fit == 0:
        return "NONE"
    return "LOW" if pods_that_fit <= 2 else "MEDIUM" if pods_that_fit <= 5 else "HIGH"


def _cuda_accepted(allowed: list[str] | None, minimum: str | None) -> bool:
    """Whether a fake host (CUDA 12.8) satisfies a CUDA constraint."""
    if allowed:
        return HOST_CUDA_VERSION in allowed
    return minimum is None or _version(minimum) <= _version(HOST_CUDA_VERSION)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))
