"""Registering ow_prefect's built-in deployments (prefect.yaml) without the Prefect CLI."""
