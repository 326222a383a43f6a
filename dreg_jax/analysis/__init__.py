"""Analysis: statistics for regularizer comparisons."""
from dreg_jax.analysis.stats import (
    average_ranks,
    bonferroni,
    paired_wilcoxon,
    power_note,
    smallest_wilcoxon_p,
    win_rates,
)
