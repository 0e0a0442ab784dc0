"""`python -m ow_prefect.costs`: the throughput table the estimates use (ow_prefect/costs/throughput.toml)."""

from ow_prefect.costs.throughput import format_table

print(format_table())
