"""The model check of `decide` (bench/pipeline_model.py) as a test: seeded random walks
through a simulated world, every invariant checked every round. A longer campaign:
`python -m bench.pipeline_model --sequences 27000`."""

from __future__ import annotations

import pytest

from bench.pipeline_model import Violation, run_sequence

SEQUENCES = 120  # about 20 s on one core


@pytest.mark.parametrize("block", range(4))
def test_decide_keeps_every_invariant_in_a_random_world(block):
    per = SEQUENCES // 4
    for seed in range(block * per, (block + 1) * per):
        run_sequence(seed)


def test_the_model_catches_a_pipeline_that_forgets_live_grants(monkeypatch):
    from meritrun import pipeline
    from meritrun.pipeline import pull, round

    for module in (pipeline, pull, round):
        monkeypatch.setattr(module, "revoke_unwanted", lambda r, wanted: None)
    with pytest.raises(Violation, match="left grants"):
        for seed in range(60):
            run_sequence(seed)
