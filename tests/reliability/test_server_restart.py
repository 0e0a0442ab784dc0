"""The Prefect server restarts (an upgrade, a crash) while pods run: the worker keeps watching through the outage
instead of deleting pods it cannot account for, the flows finish, and every pod is deleted afterwards. One run is a
real `prefect flow-run execute`, the other two light pods (tests/reliability/light_pod.py: the same states through
the same REST API, retried while the server is away, without seconds of CPU for Prefect's start-up)."""

import contextlib
import time
import uuid

import pytest

from ow_prefect.testing.servers import free_port, prefect_server, prefect_worker
from tests.runpod_support import (
    LIGHT_POD_COMMAND,
    POD_COMMAND,
    WORKER_ENV,
    assert_clean,
    assert_outputs_intact,
    deploy,
    finished,
    make_pool,
    pods_of,
    wait_for,
)

pytestmark = pytest.mark.slow

POOL = "ow-test-runpod-server-restart"
DOWN_SECONDS = 8
# How long each run works. The real run starts first and its clock runs while the light runs start, so it works
# longest: it must still be working at the end of the outage. With 20 s, CI once found a pod deleted by then: on its
# loaded machine the light runs were slow to go Running, and (the likely cause; CI kept no worker log) the real
# run's 20 s ended within the outage, its pod ending as it should
REAL_SECONDS, LIGHT_SECONDS = 45, 20


def test_runs_survive_a_prefect_server_restart(fake, tmp_path, prefect_database):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home, port = tmp_path / "server", free_port()
    with contextlib.ExitStack() as first_server:
        api = first_server.enter_context(prefect_server(home, port=port, database_template=prefect_database))
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            make_pool(client, fake, POOL, command=LIGHT_POD_COMMAND)
            real = deploy(client, POOL, "server-restart", command=POD_COMMAND)
            light = deploy(client, POOL, "server-restart-light")
            worker = prefect_worker(api, POOL, "runpod", WORKER_ENV, tmp_path / "worker.log")
            with worker:
                outputs = {}
                # the light runs start once the real one runs: its pod's Prefect start-up can take longer than a
                # light run's whole 20 s on a loaded machine, and every run must still be running at the restart
                for batch in ((real,), (light, light)):
                    started = []
                    for deployment_id in batch:
                        output = f"output-{uuid.uuid4()}"
                        seconds = REAL_SECONDS if deployment_id == real else LIGHT_SECONDS
                        flow_run = client.create_flow_run_from_deployment(
                            deployment_id, parameters={"seconds": seconds, "payload": output}
                        )
                        outputs[flow_run.id] = output
                        started.append(flow_run.id)
                    for flow_run_id in started:
                        wait_for(client, flow_run_id, lambda fr: fr.state.is_running(), timeout=120)
                runs = {flow_run_id: client.read_flow_run(flow_run_id) for flow_run_id in outputs}
                assert not any(finished(run) for run in runs.values()), (
                    f"a run ended before the outage (the machine too slow for {REAL_SECONDS} s): {runs}"
                )
                first_server.close()  # the server goes away mid-run...
                time.sleep(DOWN_SECONDS)
                assert all(not pod.deleted_at for id_ in outputs for pod in pods_of(fake, id_)), (
                    "a pod was deleted while the server was down; the worker's last lines:\n"
                    + "\n".join((tmp_path / "worker.log").read_text(errors="replace").splitlines()[-40:])
                )
                with prefect_server(home, port=port):  # ...and comes back on the same address and database
                    for flow_run_id in outputs:
                        done = wait_for(client, flow_run_id, finished, timeout=120)
                        assert done.state.is_completed(), done.state
                    assert_clean(fake)
    assert all(len(pods_of(fake, flow_run_id)) == 1 for flow_run_id in outputs)
    assert_outputs_intact(outputs)
    assert (home / "server.log").read_text().count("Configure Prefect to communicate") == 2, "one restart"
