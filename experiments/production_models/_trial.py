"""What both trials share: compare a probe term over many keys with a reference, and the table.

The scripts run in scratch environments (see README.md) and import this file from their own folder.
"""
import jax
import numpy as np

import dreg_jax


def check(rows, name, layers, references, model, variables, *args, keys=300, **options):
    """Appends a row per selected path: the term's mean +- standard error over ``keys`` probe
    keys (one jitted, vmapped program) against ``references()`` (``{path: ||J||_F^2 / B}``),
    "right" within 3 standard errors; a failing reference or call is a row saying so."""
    try:
        refs = references()
    except Exception as e:  # noqa: BLE001 - the table reports it
        rows.append((name, ",".join(layers), "-", "-", f"reference failed: {type(e).__name__}: {str(e)[:150]}"))
        return
    try:
        terms = jax.jit(jax.vmap(lambda k: dreg_jax.jacobian_terms(model, variables, *args, key=k, layers=layers,
                                                                  **options)[1]))
        values = terms(jax.random.split(jax.random.key(3), keys))
        for path in layers:
            got = np.asarray(values[path], np.float64)
            mean, se = got.mean(), got.std() / np.sqrt(len(got))
            ok = abs(mean - refs[path]) < 3 * se + 1e-5 * refs[path]
            rows.append((name, path, f"{mean:.4g} +- {se:.2g}", f"{refs[path]:.4g}", "right" if ok else "WRONG"))
    except Exception as e:  # noqa: BLE001 - the table reports it
        rows.append((name, ",".join(layers), "-", "-", f"refused/error: {type(e).__name__}: {str(e)[:200]}"))


def print_table(rows, reference):
    print(f"| case | path | term (mean +- se) | {reference} reference | verdict |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
