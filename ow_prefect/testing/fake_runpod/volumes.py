"""FakeRunPod's network volumes (`NetworkVolumes`, a mixin of `FakeRunPod`): read-only through the API, made by a
test with `add_network_volume()`; each is a local folder shared by every pod that mounts it, and a pod mounting
one is placed in its data center."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ow_prefect.testing.fake_runpod.catalog import DEFAULT_DATA_CENTER
from ow_prefect.testing.fake_runpod.spec import Problem


@dataclass
class FakeVolume:
    """A network volume: a folder on this machine shared by every pod that mounts it."""

    id: str
    name: str
    size: int
    data_center: str
    folder: Path

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "dataCenter": self.data_center, "type": "STANDARD"}


class NetworkVolumes:
    """Network volumes of `FakeRunPod` (a mixin of it): `volumes` (id -> FakeVolume)."""

    volumes: dict[str, FakeVolume]

    def add_network_volume(self, volume_id: str, data_center: str = DEFAULT_DATA_CENTER, size: int = 50) -> Path:
        """A network volume in `data_center` (while entered); returns the local folder that stands in for it."""
        folder = Path(self._workdir.name) / "volumes" / volume_id
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.volumes[volume_id] = FakeVolume(volume_id, f"volume-{volume_id}", size, data_center, folder)
        return folder

    def _list_network_volumes(self) -> dict[str, Any]:
        with self._lock:
            return {"networkVolumes": [volume.json() for volume in self.volumes.values()]}

    def _get_network_volume(self, volume_id: str) -> dict[str, Any]:
        with self._lock:
            if volume_id not in self.volumes:
                raise Problem(404, f"network volume {volume_id} not found")
            return self.volumes[volume_id].json()

    def _volume_data_center(self, body: dict[str, Any], preferred: list[str]) -> list[str]:
        """A pod mounting a network volume runs in the volume's data center."""
        network = body.get("mounts", {}).get("network") or []
        if not network:
            return preferred
        volume = self.volumes.get(network[0]["volumeId"])
        if volume is None:
            raise Problem(400, f"network volume {network[0]['volumeId']!r} not found")
        if preferred and volume.data_center not in preferred:
            raise Problem(
                400, f"network volume {volume.id} is in {volume.data_center}, not in dataCenterIds {preferred}"
            )
        return [volume.data_center]

    def _volume_env(self, mounts: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
        """The mount path does not exist here: env values under it point into the volume's local folder."""
        mount = mounts["network"][0]
        volume = self.volumes.get(mount["volumeId"])
        if volume is None:
            return env
        path = mount["path"].rstrip("/")
        return {
            k: str(volume.folder) + v[len(path) :] if v == path or v.startswith(path + "/") else v
            for k, v in env.items()
        }
