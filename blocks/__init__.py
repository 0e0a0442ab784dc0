"""Prefect blocks of ow_prefect and the helpers that create their documents."""
