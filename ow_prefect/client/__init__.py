"""The SDK: `OpenWeights` and its async twin `AsyncOpenWeights`."""

from ow_prefect.client._client import AsyncOpenWeights, OpenWeights

__all__ = ["AsyncOpenWeights", "OpenWeights"]
