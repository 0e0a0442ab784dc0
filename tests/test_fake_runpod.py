"""The fake RunPod API against plain httpx: the contract a RunPod client and worker are tested against."""

import json
import os
import sys
from pathlib import Path

import httpx
import pytest

from ow_prefect.testing.fake_runpod import CAPACITY_DETAIL, FakeRunPod, fake_runpod, spec_schemas
from tests.helpers import eventually

API_KEY = "test-key"
A6000 = "NVIDIA RTX A6000"
# Short timings keep the file fast; RunPod-like defaults are for users.
FAST = {"boot_seconds": 0.1, "restart_backoff": 0.2, "kill_grace": 2.0, "log_follow_seconds": 0.3}
KEEP_RUNNING = "exec sleep 60"


@pytest.fixture
def fake():
    with FakeRunPod(api_key=API_KEY, **FAST) as fake:
        yield fake


@pytest.fixture
def api(fake):
    with client_for(fake) as client:
        yield client


def client_for(fake: FakeRunPod) -> httpx.Client:
    return httpx.Client(base_url=fake.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)


def pod_body(**overrides) -> dict:
    return {"name": "test-pod", "image": "runpod/base:fake", "gpu": {"id": A6000, "count": 1}, **overrides}


def create(api: httpx.Client, **overrides) -> dict:
    response = api.post("/pods", json=pod_body(**overrides))
    assert response.status_code == 201, response.text
    return response.json()


def wait_until_up(api: httpx.Client, pod_id: str) -> dict:
    pod = eventually(lambda: (pod := api.get(f"/pods/{pod_id}").json())["runtime"] and pod, timeout=10, interval=0.05)
    assert pod, f"pod {pod_id} never got a runtime"
    return pod


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    return problem


def assert_follows_spec(schema_name: str, instance: dict) -> None:
    schemas = spec_schemas()
    assert schemas.errors(schema_name, instance) == []
    assert set(instance) <= schemas.properties_of(schema_name), "fields the spec does not define"


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(id, data) of every server-sent event, read with httpx-sse (the parser the RunPod client uses)."""
    from httpx_sse import EventSource

    return [(event.id, event.json()) for event in EventSource(response).iter_sse()]


def test_requests_without_the_api_key_are_refused(fake):
    assert_problem(httpx.get(f"{fake.url}/pods"), 401)
    wrong_key = httpx.get(f"{fake.url}/pods", headers={"Authorization": "Bearer nope"})
    assert assert_problem(wrong_key, 401)["detail"] == "invalid bearer token"


def test_unknown_body_fields_are_422_naming_each(api, fake):
    body = pod_body(dockerStartCmd="python run.py", gpu={"id": A6000, "gpuCount": 1})
    problem = assert_problem(api.post("/pods", json=body), 422)
    assert "'dockerStartCmd'" in problem["detail"] and "'gpuCount'" in problem["detail"]
    assert problem["errors"] == [
        "$: additional properties 'dockerStartCmd' not allowed",
        "$.gpu: additional properties 'gpuCount' not allowed",
    ]
    assert fake.pods == {}


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"image": "x", "gpu": {"id": A6000}}, 422, "'name' is a required property"),
        ({"name": "p", "gpu": {"id": A6000}}, 422, "'image' is a required property"),
        (pod_body(cpu={"id": "cpu3c", "vcpuCount": 2}), 400, "exactly one of gpu or cpu must be set"),
        ({"name": "p", "image": "x"}, 400, "exactly one of gpu or cpu must be set"),
        (pod_body(ports=["8000"]), 400, "invalid port '8000'"),
    ],
)
def test_bodies_breaking_the_create_rules_are_refused(api, body, status, detail):
    assert detail in assert_problem(api.post("/pods", json=body), status)["detail"]


def test_a_new_pod_is_running_before_its_runtime_appears(api, fake):
    pod = create(api, ports=["8000/http", "22/tcp"], args=KEEP_RUNNING)
    assert (pod["status"], pod["runtime"], pod["cost"]) == ("RUNNING", None, 0.49)
    assert_follows_spec("Pod", pod)
    assert ("POST", "/v2/pods", pod_body(ports=["8000/http", "22/tcp"], args=KEEP_RUNNING)) in fake.requests

    up = wait_until_up(api, pod["id"])
    assert_follows_spec("Pod", up)
    assert {port["private"] for port in up["runtime"]["ports"]} == {8000, 22}
    assert up["ssh"]["direct"]["host"] == "127.0.0.1" and up["startedAt"]


def test_the_pod_process_sees_the_env_sent_runpod_variables_and_nothing_of_the_test(api, fake, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_THE_TEST", "not inherited")
    report = tmp_path / "env.json"
    dump_env = f"{sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'"
    # Written aside and then renamed, so the test never reads half a file.
    command = f"{dump_env} > {report}.part && mv {report}.part {report}; {KEEP_RUNNING}"
    pod = create(api, env={"MY_SETTING": "hello"}, ports=["8000/http"], args=command)

    env = eventually(lambda: report.exists() and json.loads(report.read_text()), timeout=10, interval=0.05)
    public_port = wait_until_up(api, pod["id"])["runtime"]["ports"][0]["public"]
    assert env["MY_SETTING"] == "hello" and "FROM_THE_TEST" not in env
    gpu_bin = fake.pods[pod["id"]].workdir / ".fake-gpu-bin"  # its nvidia-smi (fake_gpus.py), then the image's PATH
    assert env["PATH"] == os.pathsep.join([str(gpu_bin), str(Path(sys.executable).parent), os.environ["PATH"]])
    assert env["OW_HOME"] == os.environ["OW_HOME"]  # the image's, here
    assert Path(env["HOME"]) == fake.pods[pod["id"]].workdir
    assert env["RUNPOD_POD_ID"] == pod["id"] and env["RUNPOD_DC_ID"] == "US-TX-3"
    assert env["RUNPOD_TCP_PORT_8000"] == str(public_port) and env["RUNPOD_PUBLIC_IP"] == "127.0.0.1"
    assert env["RUNPOD_GPU_COUNT"] == "1" and env["RUNPOD_API_KEY"] not in ("", API_KEY)
    assert api.get(f"/pods/{pod['id']}").json()["env"] == {"MY_SETTING": "hello"}


def test_an_exiting_command_is_restarted_and_the_pod_keeps_billing(api, fake):
    pod = create(api, args="echo attempt; exit 3")

    assert eventually(lambda: fake.pods[pod["id"]].restarts >= 2, timeout=10, interval=0.05)
    current = api.get(f"/pods/{pod['id']}").json()
    assert (current["status"], current["cost"]) == ("RUNNING", 0.49)
    assert [line.line for line in fake.pods[pod["id"]].logs].count("attempt") >= 2


def test_delete_kills_the_process_and_gives_the_gpu_back(api, fake):
    pod = create(api, args=KEEP_RUNNING)
    wait_until_up(api, pod["id"])
    process = fake.pods[pod["id"]].process
    assert fake.stock[(A6000, "SECURE", "US-TX-3")].count == 3

    assert api.delete(f"/pods/{pod['id']}").status_code == 204
    assert process.poll() is not None
    assert fake.stock[(A6000, "SECURE", "US-TX-3")].count == 4
    assert fake.pods[pod["id"]].status == "TERMINATED" and fake.pods[pod["id"]].deleted_at
    assert_problem(api.get(f"/pods/{pod['id']}"), 404)
    assert_problem(api.delete(f"/pods/{pod['id']}"), 404)
    assert api.get("/pods").json() == {"pods": []}


def test_a_pod_whose_stock_entry_a_test_removed_is_still_deleted(api, fake):
    """A test that takes a data center out of the catalog (`del fake.stock[...]`) while a pod there is still being
    deleted must not make that delete fail (it left the pod running for the rest of the session)."""
    fake.set_stock(A6000, 1, "SECURE", "EU-RO-1")
    pod = create(api, args=KEEP_RUNNING, dataCenterIds=["EU-RO-1"])
    del fake.stock[(A6000, "SECURE", "EU-RO-1")]
    assert api.delete(f"/pods/{pod['id']}").status_code == 204
    assert fake.pods[pod["id"]].deleted_at and (A6000, "SECURE", "EU-RO-1") not in fake.stock


def test_no_stock_left_is_a_400_with_runpods_sentence(api, fake):
    fake.set_stock("NVIDIA A100 80GB PCIe", 1)
    a100 = {"id": "NVIDIA A100 80GB PCIe", "count": 1}
    first = create(api, gpu=a100)

    assert assert_problem(api.post("/pods", json=pod_body(gpu=a100)), 400)["detail"] == CAPACITY_DETAIL
    elsewhere = pod_body(gpu=a100, cloud="COMMUNITY", dataCenterIds=["US-TX-3"])
    assert assert_problem(api.post("/pods", json=elsewhere), 400)["detail"] == CAPACITY_DETAIL
    api.delete(f"/pods/{first['id']}")
    assert create(api, gpu=a100)["dataCenterId"] == "US-TX-3"


def test_pods_are_listed_page_by_page():
    with fake_runpod(api_key=API_KEY, page_size=2, **FAST) as fake, client_for(fake) as api:
        cpu_pods = [{"name": f"cpu-{n}", "image": "x", "cpu": {"id": "cpu3c", "vcpuCount": 2}} for n in range(5)]
        created = [api.post("/pods", json=body).json()["id"] for body in cpu_pods]
        assert_follows_spec("Pod", api.get(f"/pods/{created[0]}").json())
        api.delete(f"/pods/{created[1]}")
        pages, cursor = [], None
        while True:
            page = api.get("/pods", params={"cursor": cursor} if cursor else {}).json()
            pages.append([pod["id"] for pod in page["pods"]])
            if not (cursor := page.get("pagination", {}).get("nextCursor")):
                break
        assert_problem(api.get("/pods", params={"cursor": "unknown"}), 400)

    assert pages == [[created[0], created[2]], [created[3], created[4]]]


def test_the_catalog_reports_prices_and_stock(api, fake):
    listing = api.get("/catalog/gpus").json()
    assert_follows_spec("ListGpuTypesResponse", listing)
    a6000 = next(gpu for gpu in listing["gpus"] if gpu["id"] == A6000)
    assert (a6000["memory"], a6000["price"]) == (48, {"secure": 0.49, "community": 0.33})
    assert "availability" not in a6000

    query = {"include": "AVAILABILITY", "product": "POD", "cloud": "SECURE", "count": 1}
    gpu = api.get(f"/catalog/gpus/{A6000}", params=query).json()
    assert_follows_spec("GpuType", gpu)
    assert gpu["availability"] == "MEDIUM" and [dc["id"] for dc in gpu["dataCenters"]] == ["US-TX-3"]
    assert api.get(f"/catalog/gpus/{A6000}", params=query | {"count": 4}).json()["availability"] == "LOW"

    fake.set_stock(A6000, 0)
    gone = api.get(f"/catalog/gpus/{A6000}", params=query).json()
    assert gone["availability"] == "NONE" and "dataCenters" not in gone
    community = api.get(f"/catalog/gpus/{A6000}", params=query | {"cloud": "COMMUNITY"}).json()
    assert [dc["id"] for dc in community["dataCenters"]] == ["EU-RO-1"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"include": "AVAILABILITY"}, 400),
        ({"cloud": "SECURE"}, 400),
        ({"include": "AVAILABILITY", "product": "POD", "cloud": "MOON"}, 422),
        ({"include": "EVERYTHING", "product": "POD"}, 422),
    ],
)
def test_catalog_filters_are_checked(api, query, status):
    assert_problem(api.get("/catalog/gpus", params=query), status)


def test_an_unknown_gpu_type_is_404(api):
    assert_problem(api.get("/catalog/gpus/NVIDIA GeForce GTX 480"), 404)


def test_injected_faults_answer_then_clear(api, fake):
    fake.inject("POST", r"/pods$", status=429, retry_after=7)
    limited = api.post("/pods", json=pod_body())
    assert assert_problem(limited, 429) and limited.headers["retry-after"] == "7"
    assert fake.pods == {}
    create(api)

    fake.inject("GET", r"/pods$", status=500, times=2, detail="upstream hiccup")
    assert assert_problem(api.get("/pods"), 500)["detail"] == "upstream hiccup"
    assert_problem(api.get("/pods"), 500)
    assert len(api.get("/pods").json()["pods"]) == 1


def test_a_lost_response_still_creates_the_pod(api, fake):
    fake.inject("POST", r"/pods$", lose_response=True)
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/pods", json=pod_body(name="lost-reply"))

    assert [pod["name"] for pod in api.get("/pods").json()["pods"]] == ["lost-reply"]


def test_a_lost_delete_response_still_deletes(api, fake):
    pod = create(api)
    fake.inject("DELETE", r"/pods/", lose_response=True)
    with pytest.raises(httpx.RemoteProtocolError):
        api.delete(f"/pods/{pod['id']}")

    assert_problem(api.get(f"/pods/{pod['id']}"), 404)


def test_preemption_ends_the_pod_without_a_restart(api, fake):
    # The command takes a moment to exit on SIGTERM, as a worker's flow run would, so EXITED can be seen.
    pod = create(api, args="trap 'echo got-term; sleep 0.8; exit 0' TERM; while true; do sleep 0.05; done")
    wait_until_up(api, pod["id"])
    process = fake.pods[pod["id"]].process

    fake.preempt(pod["id"])
    assert api.get(f"/pods/{pod['id']}").json()["status"] == "EXITED"
    ended = eventually(lambda: (p := api.get(f"/pods/{pod['id']}").json())["status"] == "TERMINATED" and p, 10, 0.05)
    assert ended, "a preempted pod ends as TERMINATED"
    assert ended["cost"] == 0.0 and ended["runtime"] is None
    assert process.poll() is not None and fake.pods[pod["id"]].process is process
    assert fake.pods[pod["id"]].restarts == 0
    assert "got-term" in [line.line for line in fake.pods[pod["id"]].logs]
    assert fake.stock[(A6000, "SECURE", "US-TX-3")].count == 4
    assert api.delete(f"/pods/{pod['id']}").status_code == 204


def test_logs_stream_the_command_output_as_server_sent_events(api, fake):
    pod = create(api, args=f"for n in 1 2 3; do echo line-$n; done; {KEEP_RUNNING}")
    eventually(lambda: "line-3" in [line.line for line in fake.pods[pod["id"]].logs], timeout=10, interval=0.05)

    with api.stream("GET", f"/pods/{pod['id']}/logs", params={"source": "container"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [data["line"] for _, data in events] == ["line-1", "line-2", "line-3"]
    assert {data["source"] for _, data in events} == {"container"}
    sequence = [int(event_id.rsplit("/", 1)[1]) for event_id, _ in events]
    assert sequence == sorted(sequence)

    logs, container = f"/pods/{pod['id']}/logs", {"source": "container"}
    resumed = api.get(logs, params=container, headers={"Last-Event-ID": events[0][0]})
    assert [data["line"] for _, data in sse_events(resumed)] == ["line-2", "line-3"]
    tail = api.get(logs, params=container | {"tail": 1})
    assert [data["line"] for _, data in sse_events(tail)] == ["line-3"]
    system = api.get(logs, params={"source": "system"})
    assert any("container started" in data["line"] for _, data in sse_events(system))


def test_actions_follow_the_pod_status(api, fake):
    pod = create(api, args=KEEP_RUNNING)
    wait_until_up(api, pod["id"])
    action = f"/pods/{pod['id']}/action"

    assert_problem(api.post(action, json={"action": "start"}), 409)
    assert_problem(api.post(action, json={"action": "pause"}), 422)
    stopped = api.post(action, json={"action": "stop"}).json()
    assert stopped["status"] == "EXITED" and stopped["runtime"] is None
    assert (stopped["cost"], stopped["actions"]) == (0.0, ["start", "terminate"])
    assert fake.pods[pod["id"]].process.poll() is not None
    assert_problem(api.post(action, json={"action": "restart"}), 409)

    assert api.post(action, json={"action": "start"}).json()["status"] == "RUNNING"
    wait_until_up(api, pod["id"])
    first_process = fake.pods[pod["id"]].process
    assert api.post(action, json={"action": "restart"}).json()["status"] == "RUNNING"
    wait_until_up(api, pod["id"])
    assert fake.pods[pod["id"]].process is not first_process and fake.pods[pod["id"]].restarts == 1

    assert api.post(action, json={"action": "terminate"}).status_code == 204
    assert_problem(api.get(f"/pods/{pod['id']}"), 404)


def test_patch_is_strict_and_a_locked_pod_cannot_stop(api):
    pod = create(api)
    assert "'labels'" in assert_problem(api.patch(f"/pods/{pod['id']}", json={"labels": {}}), 422)["detail"]

    assert_problem(api.patch(f"/pods/{pod['id']}", json={"ports": ["8000"]}), 400)
    patched = api.patch(f"/pods/{pod['id']}", json={"name": "renamed", "locked": True}).json()
    assert (patched["name"], patched["actions"]) == ("renamed", ["terminate"])
    assert_problem(api.post(f"/pods/{pod['id']}/action", json={"action": "stop"}), 409)


def test_routes_outside_the_fake_say_so(api):
    assert_problem(api.get("/clusters"), 501)
    assert_problem(api.put("/pods"), 405)
    assert_problem(api.get("/nothing-here"), 404)


def test_leaving_the_context_kills_every_pod_process():
    with FakeRunPod(api_key=API_KEY, **FAST) as fake, client_for(fake) as api:
        pods = [create(api, args=KEEP_RUNNING) for _ in range(2)]
        for pod in pods:
            wait_until_up(api, pod["id"])
        processes = [fake.pods[pod["id"]].process for pod in pods]

    assert all(process.poll() is not None for process in processes)


def test_network_volumes_place_pods_in_their_data_center_and_share_a_folder(fake, api):
    folder = fake.add_network_volume("vol-cache", data_center="EU-RO-1")
    fake.set_stock(A6000, 2, "SECURE", "EU-RO-1")
    assert api.get("/network-volumes").json() == {"networkVolumes": [fake.volumes["vol-cache"].json()]}
    assert api.get("/network-volumes/vol-cache").json()["dataCenter"] == "EU-RO-1"
    assert_problem(api.get("/network-volumes/vol-nope"), 404)

    mounts = {"network": [{"volumeId": "vol-cache", "path": "/workspace"}]}
    command = 'echo "$HF_HOME" > "$HF_HOME.where"; exec sleep 60'
    pod = create(api, mounts=mounts, env={"HF_HOME": "/workspace/hf"}, args=command)
    assert pod["dataCenterId"] == "EU-RO-1"  # not the default US-TX-3, where the A6000s are too
    assert eventually(lambda: (folder / "hf.where").exists(), timeout=10)
    assert (folder / "hf.where").read_text().strip() == str(folder / "hf")

    assert_problem(api.post("/pods", json=pod_body(mounts=mounts, dataCenterIds=["US-TX-3"])), 400)
    missing = {"network": [{"volumeId": "vol-nope", "path": "/workspace"}]}
    assert "not found" in assert_problem(api.post("/pods", json=pod_body(mounts=missing)), 400)["detail"]
