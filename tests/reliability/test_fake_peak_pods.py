"""FakeRunPod.peak_pods(): the most pods alive at once, which the load test bounds by the worker's --limit."""

import httpx

from ow_prefect.testing.fake_runpod import FakeRunPod


def test_peak_pods_counts_pods_alive_at_the_same_time():
    with (
        FakeRunPod(api_key="peak-key", boot_seconds=0.05) as fake,
        httpx.Client(base_url=fake.url, headers={"Authorization": "Bearer peak-key"}, timeout=10) as api,
    ):

        def create(name: str) -> str:
            body = {"name": name, "image": "runpod/base:fake", "gpu": {"id": "NVIDIA RTX A6000", "count": 1}}
            response = api.post("/pods", json=body)
            assert response.status_code == 201, response.text
            return response.json()["id"]

        assert fake.peak_pods() == 0
        first, second, third = create("a"), create("b"), create("c")
        assert fake.peak_pods() == 3
        for pod_id in (first, second):
            assert api.delete(f"/pods/{pod_id}").status_code in (200, 204)
        create("d")  # two alive now: the peak stays 3
        assert fake.peak_pods() == 3
        create("e")
        create("f")  # c, d, e, f
        assert fake.peak_pods() == 4
        api.delete(f"/pods/{third}")
        assert fake.peak_pods() == 4
