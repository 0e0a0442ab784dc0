from ow_prefect.runpod.models import GpuType
from ow_prefect.runpod.offers import rank_candidates


def gpu(gpu_id, memory, secure, community, availability="HIGH"):
    return GpuType.model_validate(
        {
            "id": gpu_id,
            "memory": memory,
            "secure": secure is not None,
            "community": community is not None,
            "price": {"secure": secure, "community": community},
            "availability": availability,
        }
    )


CATALOG = [
    gpu("NVIDIA GeForce RTX 4090", 24, 0.69, 0.34),
    gpu("NVIDIA RTX A6000", 48, 0.49, 0.33),
    gpu("NVIDIA A100 80GB PCIe", 80, 1.64, 1.19),
    gpu("NVIDIA H100 80GB HBM3", 80, 2.99, None),
    gpu("NVIDIA L40S", 48, 0.86, 0.79, availability="NONE"),
]


def names(candidates):
    return [(c.gpu_id.split()[-1], c.cloud) for c in candidates]


def test_fits_memory_and_sorts_by_price():
    assert names(rank_candidates(CATALOG, min_vram_gb=40)) == [
        ("A6000", "COMMUNITY"),
        ("A6000", "SECURE"),
        ("PCIe", "COMMUNITY"),
        ("PCIe", "SECURE"),
        ("HBM3", "SECURE"),
    ]


def test_sold_out_types_are_skipped_and_price_cap_applies():
    found = rank_candidates(CATALOG, min_vram_gb=40, max_price_per_hour=1.0, clouds=("SECURE",))
    assert names(found) == [("A6000", "SECURE")]


def test_preference_list_orders_first_and_restricts():
    found = rank_candidates(CATALOG, min_vram_gb=1, preferred=["NVIDIA A100 80GB PCIe", "NVIDIA GeForce RTX 4090"])
    assert names(found) == [("PCIe", "COMMUNITY"), ("PCIe", "SECURE"), ("4090", "COMMUNITY"), ("4090", "SECURE")]


def test_several_gpus_add_up_memory_and_price():
    found = rank_candidates(CATALOG, min_vram_gb=96, gpu_count=2, clouds=("SECURE",))
    assert found[0].gpu_id == "NVIDIA RTX A6000" and found[0].price_per_hour == 0.98 and found[0].count == 2
    assert str(found[0]) == "2x NVIDIA RTX A6000 (48 GB) in SECURE at $0.98/h"


def test_catalog_per_cloud_and_data_centers():
    secure = [
        GpuType.model_validate(
            {
                "id": "NVIDIA RTX A6000",
                "memory": 48,
                "secure": True,
                "price": {"secure": 0.49},
                "availability": "LOW",
                "dataCenters": [{"id": "US-TX-3", "availability": "LOW"}],
            }
        )
    ]
    community = [gpu("NVIDIA RTX A6000", 48, None, 0.33, availability="NONE")]
    found = rank_candidates({"SECURE": secure, "COMMUNITY": community}, min_vram_gb=40)
    assert names(found) == [("A6000", "SECURE")]
    assert rank_candidates({"SECURE": secure}, min_vram_gb=40, data_centers=["EU-RO-1"]) == []
    assert len(rank_candidates({"SECURE": secure}, min_vram_gb=40, data_centers=["US-TX-3", "EU-RO-1"])) == 1
