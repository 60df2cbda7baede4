"""The final recovery fine-tune: kept only when the model still meets the target."""

import pytest

from pyprune.compile.final import recover
from pyprune.search.candidates import Stage

from ..search.tiny import tiny_base, tiny_evaluator

MASK = Stage("mask", (0.8,))


def masked_state(ev):
    base = tiny_base()
    c = ev.measure(base, MASK, 0.8)
    return ev.state_of(base, [MASK.spec(0.8)], c)


def sparsity(state):
    weights = [state.gm.get_submodule(n).weight for n in ("conv1", "conv2", "fc")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_a_recovery_that_meets_the_target_is_kept_with_its_constraints():
    ev = tiny_evaluator(finetune_epochs=0.25)
    state = masked_state(ev)
    tuned, record = recover(ev, state, 1.0, target=0.0)
    assert record["kept"] and tuned is not state and tuned.steps == state.steps
    assert record["val_after"] == ev.accuracy(tuned.gm, ev.data.val) and tuned.val_accuracy == record["val_after"]
    assert record["val_after"] >= record["val_before"]
    assert sparsity(tuned) == pytest.approx(0.8, abs=0.005)  # the mask held through the extra epochs


def test_a_recovery_that_misses_the_target_backs_off():
    ev = tiny_evaluator(finetune_epochs=0.25)
    state = masked_state(ev)
    kept, record = recover(ev, state, 0.5, target=1.01)
    assert kept is state and not record["kept"] and "below the target" in record["reason"]


def test_a_recovery_worse_than_before_backs_off():
    ev = tiny_evaluator(finetune_epochs=0.25)
    state = masked_state(ev)
    state.val_accuracy = 1.0  # nothing can beat it
    kept, record = recover(ev, state, 0.5, target=0.0)
    assert kept is state and "below 1.0000 before" in record["reason"]


def test_a_journal_that_claims_the_target_cannot_make_met_target_true(tmp_path):
    """Issue 19, defect 2: a search record edited to claim 0.95 for a model that measures
    far less. met_target comes from the written file, which then holds the baseline."""
    import torch

    from pyprune.compile.final import write_final
    from pyprune.search.heuristic import SearchOutcome

    ev = tiny_evaluator(finetune_epochs=0.0)
    base = tiny_base()
    state = masked_state(ev)
    state.candidate.accuracy, state.candidate.meets = 0.95, True  # what the poisoned journal line says
    target = 0.9
    measured = ev.accuracy(state.gm, ev.data.val)
    assert measured < target
    final = write_final(ev, base, SearchOutcome(state, ("mask",)), ev.data.val, tmp_path, target, {"arch": "tiny"},
                        fold_batchnorm=False)
    assert not final.met_target and final.state is base
    assert final.unconfirmed == {"pipeline": state.pipeline, "search_val_accuracy": 0.95,
                                 "file_val_accuracy": measured}
    written = dict(final.decoded.named_parameters())
    assert all(torch.equal(written[name], p) for name, p in base.gm.named_parameters())
