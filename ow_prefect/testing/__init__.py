"""Helpers for tests of ow_prefect and of projects built on it: a real local Prefect server, a process
worker, and an S3 stand-in (moto). Nothing here is imported by `import ow_prefect`."""
