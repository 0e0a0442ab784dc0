"""bench/run.py's table: built from the `BENCH_RESULT` lines the benches print (canned here, no bench runs)."""

from bench.results import emit, parse, row, table


def test_result_line_round_trips_and_the_table_shows_ratios_goals_and_failures(capsys):
    emit(
        "chat", [row("throughput", 160.0, 150.0, "req/s", "ratio ≥ 0.95", True), row("cache hit p50", 0.2, None, "ms")]
    )
    emit("gpu_cost", [row("$/h", 11.0, 15.5, "$/h", "ratio ≤ 1.0", True)])
    output = "human output first\n" + capsys.readouterr().out
    chat = parse("\n".join(output.splitlines()[:2]))
    assert chat["bench"] == "chat" and chat["rows"][0]["ours"] == 160.0
    assert parse(output)["bench"] == "gpu_cost"  # the last result line wins
    assert parse("no result here") is None

    text = table([chat, parse(output)], failures={"worker": "exit status 1"})
    lines = text.splitlines()
    assert lines[0].split() == ["bench", "metric", "ours", "baseline", "ratio", "goal", "met"]
    throughput = next(line for line in lines if "throughput" in line)
    assert "160 req/s" in throughput and "150 req/s" in throughput and "1.067×" in throughput
    assert "ratio ≥ 0.95" in throughput and throughput.endswith("yes")
    cache = next(line for line in lines if "cache hit" in line)
    assert "0.2 ms" in cache and "— ms" not in cache  # no baseline, no ratio
    assert "0.710×" in next(line for line in lines if line.startswith("gpu_cost"))
    failed = next(line for line in lines if line.startswith("worker"))
    assert "FAILED: exit status 1" in failed and failed.endswith("NO")
