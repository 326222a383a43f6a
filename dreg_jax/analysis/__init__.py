"""Analysis: statistics for regularizer comparisons."""
from dreg_jax.analysis.stats import average_ranks, bonferroni, paired_wilcoxon, win_rates
