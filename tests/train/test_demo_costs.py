"""The demo's cost columns: steps measured side by side, the table relative to backprop's, and
progress reported as lines, not bars, where stderr is not a terminal."""
import pytest

from fgkernels.train import cost
from fgkernels.train.cost import StepCost, measure_step_costs
from fgkernels.train.data import load_dataset
from fgkernels.train.loop import RunResult, TrainConfig, train
from fgkernels.train.report import summary_table

TINY = dict(width=4, aux_width=4, batch_size=16, max_steps=2, epochs=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _result(algo: str, **kw) -> RunResult:
    record = {"test_acc": 0.9, "train_loss": 0.1, "step_time_s": 1.0, "peak_memory_bytes": 1}
    return RunResult(TrainConfig(algo=algo, **kw), history=[record])


def test_table_takes_the_measured_costs_relative_to_backprop():
    results = [_result("backprop"), _result("fg", guess="local"), _result("fg", guess="random")]
    costs = [StepCost(0.010, 4 << 20), StepCost(0.025, 3 << 20), StepCost(0.020, 2 << 20)]
    rows = [line.split("|") for line in summary_table(results, costs).splitlines()[2:]]
    assert [(r[4].strip(), r[5].strip()) for r in rows] == [
        ("1.00", "1.00"), ("2.50", "0.75"), ("2.00", "0.50")]
    with pytest.raises(ValueError, match="one cost per run"):
        summary_table(results, costs[:2])


def test_a_table_of_backprop_alone_gives_its_own_time_and_memory():
    """With no other run to compare, the backprop row shows milliseconds and MiB (it showed
    1.00 and 1.00, itself relative to itself)."""
    row = summary_table([_result("backprop")], [StepCost(0.010, 4 << 20)]).splitlines()
    assert "step time ms" in row[0] and "peak mem MiB" in row[0]
    assert [c.strip() for c in row[2].split("|")[4:6]] == ["10.0", "4.0"]


def test_costs_of_every_config_in_their_order(digits):
    configs = [TrainConfig(algo="backprop", **TINY), TrainConfig(algo="fg", **TINY)]
    costs = measure_step_costs(configs, digits, warmup=1, rounds=3)
    assert len(costs) == 2
    assert all(c.step_time_s > 0 and c.peak_memory_bytes > 0 for c in costs)
    with pytest.raises(ValueError, match="rounds"):
        measure_step_costs(configs, digits, rounds=0)


def test_step_time_is_the_median_of_rounds_taken_in_turn(digits, monkeypatch):
    """After the warm-up steps the configurations take one step each in turn, and a step time is
    the median of a configuration's rounds (a slow outlier round moves neither)."""
    clock, order = [0.0], []
    steps = {"backprop": iter([9, 9, 1, 2, 3, 100, 5, 0]),   # 2 warm-up, 5 rounds, 1 memory
             "local": iter([9, 9, 10, 20, 30, 1000, 50, 0])}

    def step(net, x, y, cfg, generator):
        order.append(cfg.algo)
        clock[0] += next(steps[cfg.algo])
        return {}, 0.0, 0

    monkeypatch.setattr(cost, "compute_gradients", step)
    monkeypatch.setattr(cost, "sgd_step", lambda *args: None)
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    configs = [TrainConfig(algo="backprop", **TINY), TrainConfig(algo="local", **TINY)]
    costs = cost.measure_step_costs(configs, digits, warmup=2, rounds=5)
    assert [c.step_time_s for c in costs] == [3, 30]
    assert order == ["backprop", "local"] * 8


def test_progress_off_a_terminal_is_one_line_per_epoch(digits, capsys):
    train(TrainConfig(algo="local", **{**TINY, "epochs": 2}), dataset=digits, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line.split(":")[0].strip() for line in err.splitlines()] == ["epoch 1/2", "epoch 2/2"]
