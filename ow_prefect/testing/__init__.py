"""Helpers for tests of ow_prefect and of projects built on it: a real local Prefect server and worker and an
S3 stand-in (`servers`), a fake RunPod REST v2 server whose pods are local processes (`fake_runpod`), and a tiny
locally built model with sample datasets (`tiny_model`). Nothing here is imported by `import ow_prefect`."""
