"""The docs pages of shell commands (the `dreg-jax` command, your own data) run as written: a
file of its own so that the two test workers share the docs pages (see tests/test_docs_code.py)."""
import pytest

from docs_pages import ROOT
from test_docs_code import SHELL_PAGES, _page, assert_every_block_ran_or_says_why, run_page


@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_on_the_page_runs(page, tmp_path_factory):
    assert_every_block_ran_or_says_why(page, run_page(page, tmp_path_factory))


def test_own_data_section_runs(tmp_path_factory):
    run = run_page(_page("docs/guide/your_data.md"), tmp_path_factory)
    frame = run.namespace("Your own data")["frame"]
    assert len(frame) == 8 and set(frame.regularizer) == {"none", "dreg"}
    assert frame.validation_accuracy.between(0, 1).all() and frame.test_accuracy.mean() > 0.8
    assert "validation_accuracy" in run.output["Your own data"]


