"""Prefect flows of ow_prefect, one module per job type; prefect.yaml points at them."""
