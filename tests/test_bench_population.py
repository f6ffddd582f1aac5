"""`metalearn bench population`: the member loop, the vmapped population and the
population engine's program timed in one run (tiny sizes: the figures are not the point,
that every mode runs and reports comparable numbers)."""

import math

from metalearn.cli import main
from metalearn.core.bench import measure_population
from metalearn.core.config import RuleConfig
from train_helpers import TINY_RULE


def test_measure_population_times_every_mode_per_task():
    rule = RuleConfig.small(inner_lr=3e-2, **TINY_RULE)
    report = measure_population(pairs=1, steps=4, batch=8, base_model=(16, 8, 8), rule=rule,
                                repeats=1, meta_steps=2, tasks=3)
    assert set(report["modes"]) == {"loop", "vmap", "program"}
    program = report["modes"]["program"]
    assert program["tasks_per_call"] == 6 and program["compile_s"] > 0
    for mode in report["modes"].values():
        assert mode["seconds"] > 0 and math.isfinite(mode["over_loop"])
    assert report["modes"]["loop"]["over_loop"] == 1.0
    assert math.isclose(report["program_tasks_per_s_over_loop"],
                        1.0 / program["over_loop"])
    assert report["max_fitness_difference"] < 1e-4


def test_cli_bench_population_rejects_a_bad_count(capsys):
    try:
        main(["bench", "population", "--meta-steps", "0"])
    except SystemExit as err:
        assert "--meta-steps must be >= 1" in str(err)
    else:
        raise AssertionError("--meta-steps 0 was accepted")
