"""ATTD on Long Range Arena tasks: fixed Mamba, full TTT, ponder-or-not and ATTD compared.

:mod:`~experiments.attd_lra.main` runs it (config -> data, training, cells, results.json);
:mod:`~experiments.attd_lra.methods` holds the method names, :mod:`~.training` one cell,
:mod:`~.aggregate` the seed aggregation, :mod:`~.report` the tables and plots and
:mod:`~.readings` the conclusions.
"""

from attd.method import ATTDParams
from experiments.attd_lra.aggregate import SCALARS, aggregate
from experiments.attd_lra.checks import model_config, validate
from experiments.attd_lra.main import demo_rows, load_task, run
from experiments.attd_lra.methods import (
    CONTROLLED,
    METHODS,
    MethodSpec,
    method_label,
    parse_method,
    seed_methods,
)
from experiments.attd_lra.readings import paired_difference, reading
from experiments.attd_lra.report import summary, summary_table, write_report
from experiments.attd_lra.training import (
    initial_thresholds,
    make_method,
    make_pretrain_step,
    pretrain,
)

__all__ = [
    "ATTDParams",
    "CONTROLLED",
    "METHODS",
    "SCALARS",
    "MethodSpec",
    "aggregate",
    "demo_rows",
    "initial_thresholds",
    "load_task",
    "make_method",
    "make_pretrain_step",
    "method_label",
    "model_config",
    "paired_difference",
    "parse_method",
    "pretrain",
    "reading",
    "run",
    "seed_methods",
    "summary",
    "summary_table",
    "validate",
    "write_report",
]
