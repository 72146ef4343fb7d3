"""bench.taylor_form's verdict per model and step count."""

from bench.taylor_form import per_steps


def test_per_steps_names_the_better_form():
    rows = [
        {"model": "a", "steps": 20, "newton_minus_taylor_db": d} for d in (0.3, 0.1, -0.05)
    ] + [{"model": "a", "steps": 50, "newton_minus_taylor_db": d} for d in (-0.5, -0.2)] + [
        {"model": "b", "steps": 20, "newton_minus_taylor_db": d} for d in (0.02, -0.03)
    ]
    out = {(r["model"], r["steps"]): r for r in per_steps(rows)}
    assert out[("a", 20)]["better"] == "newton" and out[("a", 20)]["newton_wins"] == 2
    assert out[("a", 50)]["better"] == "taylor" and out[("a", 50)]["taylor_wins"] == 2
    assert out[("b", 20)]["better"] == "tie"
