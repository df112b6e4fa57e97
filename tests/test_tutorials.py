"""Run every tutorial script of the documentation (small sizes) and check what it computes.

The scripts in ``docs/tutorials`` are the pages of the tutorials section; running them here
keeps them from rotting. Each one runs in this process (``runpy``) with
``DEQKIT_TUTORIAL_SMALL=1`` and the values it leaves in its namespace are checked below.
"""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
TUTORIALS = DOCS / "tutorials"


def check_linear_deq(ns):
    # Exercise 1: the closed form (I - W)^{-1}(Ux + b), in float64.
    assert ns["picard_error"] < 1e-10 and ns["anderson_error"] < 1e-10
    assert ns["bound_holds"]
    assert ns["nonnormal_error"] < 1e-9
    # Exercise 2: implicit gradient = closed form = finite differences.
    assert ns["gradient_error"] < 1e-10
    assert ns["finite_difference_error"] < 1e-5
    errors = ns["unrolled_errors"]
    assert errors[5] > errors[10] > errors[20] and errors[40] < 1e-10
    cond = ns["conditioning"]
    assert cond[0.99]["cond"] > 10 * cond[0.5]["cond"]
    assert cond[0.99]["grad_norm"] > cond[0.5]["grad_norm"]


def check_compare(ns):
    assert abs(ns["deq_memory_growth"]) < 0.1  # O(1) in the number of solver steps
    assert ns["unrolled_slope"] > 0  # O(L) for backprop through the unrolled cell
    assert ns["implicit_gradient_error"] < 1e-6
    assert ns["jfb_gradient_error"] > 1e-3  # Jacobian-free: biased
    assert (Path(ns["out"]) / "compare.md").stat().st_size > 0


def check_classifier(ns):
    history = ns["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert ns["final_accuracy"] > 0.6  # 10 classes: chance is 0.1
    assert ns["rho_max"] < 1


def check_language_model(ns):
    assert ns["final_bpc"] < ns["initial_bpc"] - 1.0
    assert ns["sample"].startswith("MACBETH.\n") and len(ns["sample"]) > 20


def check_hypernetworks(ns):
    assert ns["hyper_mse_after"] < 0.5 * ns["hyper_mse_before"]
    assert ns["chunked_difference"] < 1e-5
    loss = ns["out"]["loss"]
    assert sum(loss[-5:]) < sum(loss[:5])
    assert ns["learned"].result.name == "successful"
    assert ns["hyper_agreement"] < 1e-2


def check_implicit_layers(ns):
    assert ns["kepler_residual"] < 1e-12
    assert ns["kepler_gradient_error"] < 1e-10
    assert ns["ridge_value_error"] < 1e-10
    assert ns["ridge_gradient_error"] < 1e-8
    assert ns["validation"][-1] < ns["validation"][0]


def check_bilevel(ns):
    assert ns["first_error"] < 1e-9 and ns["second_error"] < 1e-8  # vs the closed form
    assert ns["fd_error"] < 1e-6  # vs finite differences of the first derivative
    assert ns["newton_error"] < 1e-5 < ns["gd_error"]  # Newton converged, gradient descent not


CHECKS = {
    "bilevel": check_bilevel,
    "linear_deq": check_linear_deq,
    "compare": check_compare,
    "classifier": check_classifier,
    "language_model": check_language_model,
    "hypernetworks": check_hypernetworks,
    "implicit_layers": check_implicit_layers,
}
SCRIPTS = sorted(p.stem for p in TUTORIALS.glob("*.py"))


def test_every_tutorial_is_checked_and_published():
    assert sorted(CHECKS) == SCRIPTS
    pages = "".join(p.read_text() for p in TUTORIALS.glob("*.md"))
    for name in SCRIPTS:
        assert f"<!-- tutorial: {name}.py -->" in pages, f"no page includes {name}.py"


@pytest.mark.parametrize("name", SCRIPTS)
def test_tutorial(name, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DEQKIT_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("DEQKIT_TUTORIAL_OUT", str(tmp_path))
    ns = runpy.run_path(str(TUTORIALS / f"{name}.py"), run_name="__main__")
    assert capsys.readouterr().out.strip()  # the tutorials print what they show
    CHECKS[name](ns)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tutorial_pages_render_cells():
    hook = _load(DOCS / "_ext" / "tutorials.py")
    md = hook.script_to_markdown(
        '"""Title.\n\nIntro $x$."""\n\n# %% [markdown]\n# ## Part\n#\n# text\n\n'
        "# %%\nx = 1\n\n# %%\n\n",
        "demo.py",
    )
    assert md.startswith("Title.\n\nIntro $x$.")
    assert "## Part\n\ntext" in md
    assert "```python\nx = 1\n```" in md
    assert md.count("```python") == 1  # empty cells are dropped
    assert "[`demo.py`](demo.py)" in md
