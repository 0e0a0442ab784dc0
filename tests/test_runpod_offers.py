from ow_prefect.runpod.models import CudaVersionAvailability, DataCenterAvailability, GpuType
from ow_prefect.runpod.offers import DEFAULT_VRAM_MARGIN, is_data_center_gpu, rank_candidates, rank_offers, with_margin


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


def test_the_margin_moves_a_job_that_would_fill_a_card_to_the_next_size():
    """A 44 GB estimate fits a 48 GB card only with no margin; the default margin (what the worker applies to
    `min_vram_gb`, `vram_margin` job variable) asks for 50.6 GB."""
    assert DEFAULT_VRAM_MARGIN == 0.15 and with_margin(44) == 50.6 and with_margin(44, 0) == 44
    tight = rank_candidates(CATALOG, min_vram_gb=with_margin(44, 0), clouds=("SECURE",))
    safe = rank_candidates(CATALOG, min_vram_gb=with_margin(44), clouds=("SECURE",))
    assert names(tight)[0] == ("A6000", "SECURE") and names(safe)[0] == ("PCIe", "SECURE")


async def test_create_on_first_walks_candidates_against_the_fake():
    import pytest

    from ow_prefect.runpod import AsyncRunPodClient, RunPodNoCapacity
    from ow_prefect.runpod.offers import create_on_first, find_candidates
    from ow_prefect.testing.fake_runpod import CAPACITY_DETAIL, FakeRunPod

    with FakeRunPod(api_key="k") as fake:
        async with AsyncRunPodClient("k", base_url=fake.url, backoff_s=0.01) as runpod:
            candidates = await find_candidates(runpod, min_vram_gb=40, clouds=("SECURE",))
            assert [c.gpu_id for c in candidates][:2] == ["NVIDIA RTX A6000", "NVIDIA A100 80GB PCIe"]
            fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL)
            logged = []
            request = {"name": "ow-test", "image": "img", "args": "sleep 60"}
            pod, used = await create_on_first(runpod, request, candidates, min_cuda_version="12.4", log=logged.append)
            assert used == candidates[1] and pod.gpu.id == "NVIDIA A100 80GB PCIe"
            assert fake.requests[-1][2]["gpu"] == {"id": "NVIDIA A100 80GB PCIe", "count": 1, "minCudaVersion": "12.4"}
            assert logged[1].startswith("No capacity for 1x NVIDIA RTX A6000")
            fake.inject("POST", r"/pods$", status=400, detail=CAPACITY_DETAIL, times=2)
            with pytest.raises(RunPodNoCapacity) as raised:
                await create_on_first(runpod, request, candidates[:2], log=logged.append)
            assert len(raised.value.tried) == 2 and "A100 80GB PCIe" in str(raised.value)
            with pytest.raises(ValueError, match="not RunPod GPU type ids"):
                await find_candidates(runpod, min_vram_gb=1, preferred=["NVIDIA RTX 9999"])


def with_cuda(gpu_type, *versions, available=True):
    return gpu_type.model_copy(
        update={"cuda_versions": [CudaVersionAvailability(version=v, available=available) for v in versions]}
    )


CUDA_CATALOG = [
    with_cuda(gpu("NVIDIA GeForce RTX 4090", 24, 0.59, None), "12.8", "13.0"),
    with_cuda(gpu("NVIDIA RTX A6000", 48, 0.49, None), "12.4", "12.8"),
    with_cuda(gpu("NVIDIA A100 80GB PCIe", 80, 1.64, None), "12.2"),
    with_cuda(gpu("NVIDIA H100 80GB HBM3", 80, 2.69, None), "13.0", available=False),
    with_cuda(gpu("Tesla V100-SXM2-32GB", 32, 0.2, None), "13.0"),
]


def test_the_cuda_floor_needs_a_free_host_at_or_above_it():
    ranking = rank_offers(CUDA_CATALOG, min_vram_gb=20, clouds=("SECURE",), min_cuda_version="13.0")
    # A6000 and A100 hosts are too old, the H100's 13.0 hosts are taken, CUDA 13 cannot run on a V100 at all
    assert names(ranking.candidates) == [("4090", "SECURE")] and ranking.candidates[0].min_cuda_version == "13.0"
    assert ranking.removed == {"cuda": 4} and ranking.considered == 5


def test_data_center_gpus_get_the_forward_compatible_floor_and_consumer_cards_do_not():
    assert is_data_center_gpu("NVIDIA A100 80GB PCIe") and is_data_center_gpu("NVIDIA L40S")
    assert not is_data_center_gpu("NVIDIA GeForce RTX 4090") and not is_data_center_gpu("NVIDIA RTX A6000")
    ranking = rank_offers(
        CUDA_CATALOG, min_vram_gb=20, clouds=("SECURE",), min_cuda_version="13.0", data_center_min_cuda_version="12.2"
    )
    floors = {c.gpu_id.split()[-1]: c.min_cuda_version for c in ranking.candidates}
    assert floors == {"4090": "13.0", "PCIe": "12.2"}  # the A6000 is a workstation card: no forward compatibility


def test_every_filter_counts_what_it_removed():
    a40 = gpu("NVIDIA A40", 48, 0.35, None).model_copy(
        update={"data_centers": [DataCenterAvailability(id="EU-RO-1", availability="HIGH")]}
    )
    secure = [
        with_cuda(gpu("NVIDIA GeForce RTX 4090", 24, 0.59, None), "13.0"),  # vram
        with_cuda(gpu("NVIDIA L40S", 48, 0.86, None, availability="NONE"), "13.0"),  # stock
        with_cuda(a40, "13.0"),  # data_centers
        with_cuda(gpu("NVIDIA RTX A6000", 48, 0.49, None), "12.8"),  # the one left
        with_cuda(gpu("NVIDIA A100 80GB PCIe", 80, 1.64, None), "12.2"),  # cuda
        with_cuda(gpu("NVIDIA H100 80GB HBM3", 80, 2.69, None), "13.0"),  # price
        with_cuda(gpu("NVIDIA H200", 141, 3.59, None), "13.0"),  # gpu_types
    ]
    community = [gpu("NVIDIA RTX A6000", 48, 0.49, None)]  # cloud: only offered in SECURE
    ranking = rank_offers(
        {"SECURE": secure, "COMMUNITY": community},
        min_vram_gb=40,
        preferred=[g.id for g in secure[:-1]],
        data_centers=["US-TX-3"],
        min_cuda_version="12.8",
        max_price_per_hour=2.0,
    )
    assert names(ranking.candidates) == [("A6000", "SECURE")]
    assert ranking.considered == 8
    assert ranking.removed == {
        "vram": 1,
        "stock": 1,
        "data_centers": 1,
        "cuda": 1,
        "price": 1,
        "gpu_types": 1,
        "cloud": 1,
    }
