"""The loss curve is a real plot: axes with round ticks, axis titles, and a labelled line per series."""

import xml.etree.ElementTree as ET

from flows.finetune.reporting import loss_curve_svg, metrics_table, nice_ticks

SVG = "{http://www.w3.org/2000/svg}"


def test_round_ticks_cover_the_range():
    assert nice_ticks(0, 20) == [0, 5, 10, 15, 20]
    assert nice_ticks(0.62, 0.71) == [0.6, 0.65, 0.7, 0.75]
    assert nice_ticks(3, 3) == [3, 3.5, 4]  # a single value still gets an axis


def test_the_loss_curve_has_axes_ticks_and_a_labelled_series_each():
    history = [{"step": s, "loss": 2.0 - 0.05 * s} for s in range(1, 31)]
    history += [{"step": 10, "eval_loss": 1.7}, {"step": 20, "eval_loss": 1.3}, {"step": 30, "eval_loss": 1.1}]
    root = ET.fromstring(loss_curve_svg(history))
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "step" in texts and "loss" in texts  # axis titles
    assert "train loss" in texts and "eval loss" in texts  # the legend
    assert {"0", "10", "20", "30"} <= set(texts)  # x ticks
    assert {"0.5", "1", "1.5", "2"} <= set(texts)  # y ticks
    lines = {line.get("class"): line.get("points").split() for line in root.iter(f"{SVG}polyline") if line.get("class")}
    assert len(lines["train"]) == 30 and len(lines["eval"]) == 3
    (x_first, y_first), (x_last, y_last) = (map(float, lines["train"][i].split(",")) for i in (0, -1))
    assert x_last > x_first and y_last > y_first  # SVG's y grows downwards: the loss fell


def test_no_loss_logged_says_so():
    assert "no loss was logged" in loss_curve_svg([{"step": 1, "learning_rate": 1e-4}])


def test_the_metrics_table_rounds_to_four_significant_digits():
    history = [
        {"step": 1, "epoch": 0.0625, "loss": 0.6931471824645996, "learning_rate": 2.0000000000000002e-05},
        {"step": 1, "grad_norm": 2.454176664352417},  # a row without a loss is left out
        {"step": 2, "eval_loss": 0.70214, "eval_runtime": 1.5},
    ]
    assert metrics_table(history) == [
        {"step": 1, "epoch": 0.0625, "loss": 0.6931, "learning_rate": 2e-05},
        {"step": 2, "eval_loss": 0.7021},
    ]
