"""The side-by-side section of `bench --suite=speed` (jaxmp against transformers + torch):
its ratios, targets and table from given timings, and its absence without torch. torch
is never a test dependency, so the measuring itself runs only in the bench."""

from __future__ import annotations

import importlib.util

from experiments.bench import compare


def _result(jaxmp_step: float, torch_step: float, b1: tuple[float, float],
            b8: tuple[float, float]) -> compare.CompareResult:
    return compare.CompareResult(
        model={"num_layers": 12}, versions={"torch": "x"},
        train_step_s={"jaxmp": [jaxmp_step, jaxmp_step * 3, jaxmp_step],
                      "torch": [torch_step, torch_step, torch_step / 3]},
        decode_tokens_per_s={"jaxmp": {"1": [b1[0]] * 3, "8": [b8[0]] * 3},
                             "torch": {"1": [b1[1]] * 3, "8": [b8[1]] * 3}})


def test_ratios_are_speed_over_torchs_from_medians():
    """Ratios > 1 mean jaxmp is faster: torch's step time over jaxmp's, jaxmp's tokens/s
    over torch's, each from the medians (one slow outlier per side ignored). Catches: an
    inverted ratio (time over time the wrong way), a mean instead of the median."""
    r = _result(10.0, 12.0, (48.0, 40.0), (100.0, 125.0))
    ratios = r.ratios()
    assert ratios["train step"] == 1.2
    assert ratios["decode batch 1"] == 1.2 and ratios["decode batch 8"] == 0.8
    j = r.to_json()["compare"]
    assert j["train_step_s"] == {"jaxmp": 10.0, "torch": 12.0}
    assert j["decode_tokens_per_s"]["torch"]["8"] == 125.0


def test_targets_are_the_issues_limits():
    """Training >= 1.0x torch, decoding >= 1.2x at batch 1 and >= 1.0x at batch 8; each
    met or missed on its own. Catches: a limit applied to the wrong row, a target that
    cannot fail."""
    met = {t.target: t.ok for t in _result(10.0, 10.0, (48.0, 40.0), (100.0, 100.0)).targets()}
    assert met == {"train step speed >= 1.0x torch": True,
                   "decode batch 1 >= 1.2x transformers": True,
                   "decode batch 8 >= 1.0x transformers": True}
    missed = {t.target: t.ok for t in _result(10.5, 10.0, (47.0, 40.0), (99.0, 100.0)).targets()}
    assert not any(missed.values())
    text = _result(10.0, 12.0, (48.0, 40.0), (100.0, 125.0)).table()
    assert "1.20x" in text and "0.80x" in text and "transformers + torch" in text


def test_without_torch_the_section_is_left_out(monkeypatch):
    """Without torch or transformers the section returns None (the speed suite prints the
    rest), and the module imports neither at import time. Catches: the speed suite
    failing on a machine without the `compare` extra."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "transformers") else real(name, *a))
    assert not compare.available()
    assert compare.compare_suite(quick=True) is None
    source = open(compare.__file__).read().split('"""', 2)[2]
    head = source.split("\ndef ", 1)[0]
    assert "import torch" not in head and "import transformers" not in head
