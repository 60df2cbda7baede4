import math

import pytest
import torch

from pyprune.search.candidates import Stage
from pyprune.search.evaluator import L1_BUDGET_SHARE, Budget, BudgetExhausted
from pyprune.search.journal import Journal, ResumeMismatch
from pyprune.train import TrainHooks

from .tiny import tiny_base, tiny_evaluator

MASK = Stage("mask", (0.5, 0.8))


def test_a_candidate_is_measured_once_then_served_from_the_cache():
    ev, base = tiny_evaluator(), tiny_base()
    first = ev.screen(base, MASK, 0.5)
    again = ev.screen(base, MASK, 0.5)
    assert ev.measured == 1 and ev.journal.hits == 1 and again == first
    tuned = ev.measure(base, MASK, 0.5)
    assert ev.measure(base, MASK, 0.5) == tuned and ev.measured == 2 and ev.journal.hits == 2
    assert tuned.phase == "finetune" and tuned.n == 200 and first.n == 100 and tuned.key != first.key
    # a screen is judged on its paired estimate of val accuracy: parent's val + (child - parent) on the subset
    parent_on_subset = ev.accuracy(tiny_base().gm, ev.data.screen)
    assert first.extra["estimate"] == pytest.approx(0.5 + first.accuracy - parent_on_subset)


def _log_probs_by_hand(gm, data):
    from .tiny import MEAN, STD

    x = (data.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.log_softmax(gm.eval()(x), dim=1)


def test_a_screen_records_how_far_its_predictions_moved_from_the_parents():
    ev, base = tiny_evaluator(), tiny_base()
    nothing = "mask(sparsity=0.0)"
    base = ev.apply(base, [nothing])  # recalibrated, so BatchNorm is the same on both sides
    base.val_accuracy = 0.5
    c = ev.screen_pipeline(base, [MASK.spec(0.8)], "mask", 0.8)
    child = ev.apply(base, [MASK.spec(0.8)])  # the same child: the passes and the recalibration are seeded
    parent, pushed = _log_probs_by_hand(base.gm, ev.data.screen), _log_probs_by_hand(child.gm, ev.data.screen)
    by_hand = (parent.exp() * (parent - pushed)).sum(1).mean().item()  # KL(parent || child), per image, averaged
    assert by_hand > 0.0
    assert c.extra["divergence"] == pytest.approx(by_hand, rel=1e-3)
    # a screen that changes nothing moves nothing
    assert ev.screen_pipeline(base, [nothing], "mask", 0.0).extra["divergence"] == pytest.approx(0.0, abs=1e-6)


def test_measured_size_is_the_ppz_file_and_shrinks_with_sparsity():
    ev, base = tiny_evaluator(), tiny_base()
    sizes = [ev.screen(base, MASK, s).size_bytes for s in MASK.levels]
    assert sizes[0] > sizes[1] > 0


def test_the_accepted_state_is_the_measured_model(tmp_path):
    journal = Journal(tmp_path, {"x": 1})
    ev, base = tiny_evaluator(journal=journal), tiny_base()
    c = ev.measure(base, MASK, 0.8)
    state = ev.state_of(base, [MASK.spec(0.8)], c)
    assert ev.accuracy(state.gm, ev.data.val) == c.accuracy
    weights = [state.gm.get_submodule(n).weight for n in ("conv1", "conv2", "fc")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=0.005)  # the global mask held through fine-tuning
    # after a restart the fine-tuned weights come back from the journal's folder
    ev2 = tiny_evaluator(journal=Journal(tmp_path, {"x": 1}, resume=True))
    again = ev2.state_of(base, [MASK.spec(0.8)], ev2.journal.get(c.key))
    assert ev2.measured == 0
    assert all(torch.equal(a, b) for a, b in zip(state.gm.state_dict().values(), again.gm.state_dict().values()))


def test_a_gradual_mask_candidate_has_the_pass_exact_zeros_and_then_the_quantizer_codebooks():
    """Masked during its fine-tune (8 of 16 steps), quantized after: the same global
    zero count as masking at once, at most 2**3 values a layer, and other weights."""
    specs = ["mask(sparsity=0.6)", "quant(bits=3)"]
    layers = ("conv1", "conv2", "fc")
    states = {}
    for gradual in (True, False):
        ev, base = tiny_evaluator(finetune_epochs=2.0, gradual_mask=gradual), tiny_base()
        c = ev.measure_pipeline(base, specs, "mask+quant", None)
        state = ev.state_of(base, specs, c)
        assert c.phase == "finetune" and ev.accuracy(state.gm, ev.data.val) == c.accuracy
        weights = [state.gm.get_submodule(n).weight.detach() for n in layers]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.6 * sum(w.numel() for w in weights))
        assert all(len(torch.unique(w[w != 0])) <= 8 for w in weights)
        assert state.pipeline == ",".join(specs)
        states[gradual] = weights
    assert not all(torch.equal(a, b) for a, b in zip(states[True], states[False]))


@pytest.mark.parametrize("gradual", [False, True])
def test_a_state_whose_weights_were_lost_is_rebuilt_by_the_same_fine_tune(gradual):
    """A journal that kept its records but not its weights: the state is made again
    (mask at once or gradually, as measured), weight for weight."""
    specs = ["mask(sparsity=0.6)", "quant(bits=3)"]
    ev, base = tiny_evaluator(gradual_mask=gradual), tiny_base()
    c = ev.measure_pipeline(base, specs, "mask+quant", None)
    measured = ev.state_of(base, specs, c)
    assert ev.journal.load_weights(c.key.removesuffix("#val")) is None  # an in-memory journal keeps no weights
    again = tiny_evaluator(journal=ev.journal, gradual_mask=gradual)
    rebuilt = again.state_of(base, specs, c)
    assert rebuilt is not measured and again.measured == 0
    assert all(torch.equal(a, b) for a, b in zip(measured.gm.state_dict().values(), rebuilt.gm.state_dict().values()))


@pytest.fixture
def fine_tunes(monkeypatch) -> list:
    """The training settings of every fine-tune the evaluator runs, in order."""
    import pyprune.search.evaluator as evaluator
    configs = []
    real = evaluator.fine_tune

    def spy(gm, dataset, mean, std, config, **kwargs):
        configs.append(config)
        return real(gm, dataset, mean, std, config, **kwargs)
    monkeypatch.setattr(evaluator, "fine_tune", spy)
    return configs


def test_a_retry_at_twice_the_effort_continues_the_held_fine_tune(fine_tunes):
    """Effort 2 is effort 1's model fine-tuned once more (at the continuation rate):
    the same weights as doing that by hand, for one configured fine-tune of training,
    and the same weights again when a resumed run lost every saved model."""
    specs = ["mask(sparsity=0.6)", "quant(bits=3)"]
    ev, base = tiny_evaluator(finetune_epochs=0.25), tiny_base()
    once = ev.measure_pipeline(base, specs, "mask+quant", None)
    twice = ev.measure_pipeline(base, specs, "mask+quant", None, effort=2)
    assert [c.epochs for c in fine_tunes] == [0.25, 0.25] and twice.finetune_epochs == 0.5 and twice.key != once.key
    by_hand = tiny_evaluator(finetune_epochs=0.25)
    by_hand_once = by_hand.finetune(by_hand.apply(base, specs), 0.25, key="a@ft")
    by_hand_twice = by_hand.finetune(by_hand_once, 0.25, key="b@ft")
    state = ev.state_of(base, specs, twice)
    assert twice.accuracy == ev.accuracy(state.gm, ev.data.val)
    assert all(torch.equal(a, b) for a, b in zip(by_hand_twice.gm.state_dict().values(), state.gm.state_dict().values()))
    rebuilt = tiny_evaluator(finetune_epochs=0.25, journal=ev.journal).state_of(base, specs, twice)
    assert all(torch.equal(a, b) for a, b in zip(state.gm.state_dict().values(), rebuilt.gm.state_dict().values()))
    # effort 4 continues effort 2: one more fine-tune of twice the configured length
    fine_tunes.clear()
    ev.measure_pipeline(base, specs, "mask+quant", None, effort=4)
    assert [c.epochs for c in fine_tunes] == [0.5]


def test_untrained_first_spends_no_fine_tune_on_a_model_that_meets_without_one(fine_tunes):
    specs = ["mask(sparsity=0.5)"]
    ev, base = tiny_evaluator(), tiny_base()  # target 0: the recalibrated child meets
    c = ev.measure_pipeline(base, specs, "mask", 0.5, untrained_first=True)
    assert fine_tunes == [] and c.phase == "val" and c.finetune_epochs == 0 and c.n == 200 and c.meets
    state = ev.state_of(base, specs, c)  # the recalibrated child, rebuilt exactly
    assert ev.accuracy(state.gm, ev.data.val) == c.accuracy
    assert all(torch.equal(a, b) for a, b in zip(state.gm.state_dict().values(),
                                                  ev.apply(base, specs).gm.state_dict().values()))
    # a model that does not meet untrained is fine-tuned as without the flag, and both are recorded
    ev, base = tiny_evaluator(target=1.01), tiny_base()
    c = ev.measure_pipeline(base, specs, "mask", 0.5, untrained_first=True)
    assert [t.epochs for t in fine_tunes] == [0.5] and c.phase == "finetune"
    plain = tiny_evaluator(target=1.01).measure_pipeline(tiny_base(), specs, "mask", 0.5)
    assert c.accuracy == plain.accuracy and c.key == plain.key
    assert [r.phase for r in ev.journal] == ["val", "finetune"]


def test_divergence_rolls_the_candidate_back_and_marks_it_failed():
    ev, base = tiny_evaluator(lr=1e12), tiny_base()
    before = {k: v.clone() for k, v in base.gm.state_dict().items()}
    c = ev.measure(base, MASK, 0.5)
    assert c.status == "failed" and not c.meets and "rolled back" in c.reason and "diverged" in c.reason
    assert all(torch.equal(before[k], v) for k, v in base.gm.state_dict().items())
    assert ev.journal.get(c.key).status == "failed"


def test_budget_stops_new_measurements_but_not_cache_hits():
    ev, base = tiny_evaluator(minutes=1e-9), tiny_base()
    with pytest.raises(BudgetExhausted):
        ev.screen(base, MASK, 0.5)
    ok = tiny_evaluator()
    c = ok.screen(base, MASK, 0.5)
    ev.journal.put(c)
    assert ev.screen(base, MASK, 0.5) == c


def test_journal_persists_and_refuses_other_settings(tmp_path):
    ev = tiny_evaluator(journal=Journal(tmp_path, {"lr": 0.05}))
    c = ev.screen(tiny_base(), MASK, 0.5)
    with open(tmp_path / "journal.jsonl", "a") as f:
        f.write('{"key": "cut sho')  # a line cut short by a kill
    resumed = Journal(tmp_path, {"lr": 0.05}, resume=True)
    assert len(resumed) == 1 and resumed.get(c.key) == c and resumed.replayed_seconds == pytest.approx(c.seconds)
    with pytest.raises(ResumeMismatch, match="lr"):
        Journal(tmp_path, {"lr": 0.1}, resume=True)
    fresh = Journal(tmp_path, {"lr": 0.05})  # not resuming: starts a new journal
    assert len(fresh) == 0 and math.isclose(fresh.replayed_seconds, 0.0)


def test_a_step_starts_only_if_it_is_expected_to_end_within_the_budget():
    """Overrun is bounded by how wrong the expectation is, not by a whole step."""
    now = [0.0]
    budget = Budget(1.0, Journal(), clock=lambda: now[0])  # 60 s
    budget.keep("final fine-tune", 6.0)
    budget.keep("writing", 4.0)
    durations, last = [7.0, 9.0, 8.0, 9.5, 8.5, 7.5, 9.0, 8.0], 0.0
    ran = 0
    for d in durations:
        try:
            budget.check(expected=last)
        except BudgetExhausted as exc:
            assert "needs about" in str(exc)
            break
        now[0] += d
        last, ran = max(last, d), ran + 1
    # 7 + 9 + 8 + 9.5 = 33.5; the next (expected 9.5) would reach 43 + 10 reserved < 60: it runs;
    # then 42 + 9.5 + 10 = 61.5 >= 60 stops
    assert ran == 5 and now[0] == pytest.approx(42.0)
    assert now[0] + budget.reserve <= 60.0
    assert budget.left() == pytest.approx(18.0)


def test_sparsity_training_takes_at_most_its_share_of_the_budget(monkeypatch):
    """A fake second per training step and a 1-minute budget: L1 training may take 20%
    (12 s) of it, so 2 epochs (16 steps of 32 of 256 images) are cut to 12 steps, and
    the candidate, its pipeline and the budget's record say what it trained."""
    clock = [0.0]
    monkeypatch.setattr("pyprune.train.time.perf_counter", lambda: clock[0])
    monkeypatch.setattr("pyprune.search.evaluator.constraint_hooks", lambda passes, gm: TrainHooks(
        after_step=[lambda m: clock.__setitem__(0, clock[0] + 1.0)]))
    ev, base = tiny_evaluator(minutes=1.0), tiny_base()
    assert L1_BUDGET_SHARE * 60.0 == pytest.approx(12.0)
    c, state = ev.sparsity_train(base, 1e-3, 2.0)
    assert c.finetune_epochs == pytest.approx(12 * 32 / 256) and c.pipeline == "l1(strength=0.001,epochs=1.5)"
    assert state.prefix == c.pipeline and c.key == "l1(strength=0.001,epochs=2.0)@ft#val"
    unlimited, _ = tiny_evaluator().sparsity_train(tiny_base(), 1e-3, 2.0)
    assert unlimited.finetune_epochs == 2.0 and unlimited.pipeline == "l1(strength=0.001,epochs=2.0)"


def test_the_budget_keeps_back_each_owner_part_of_its_reserve():
    budget = Budget(1.0, Journal(), clock=lambda: 0.0)
    budget.keep("final fine-tune", 20.0)
    budget.keep("per-layer settings", 15.0)
    budget.keep("final fine-tune", 25.0)  # a new pace replaces its own part only
    assert budget.reserve == 40.0 and budget.exhausted_for(20.0) and not budget.exhausted_for(19.0)
    budget.keep("per-layer settings", 0.0)
    assert budget.reserve == 25.0


def test_a_screen_with_recovery_steps_measures_the_briefly_fine_tuned_child():
    """screen_steps=4: the screen measures the recalibrated child after 4 fine-tuning
    steps that keep the pass's zeros, which is what applying the pass and
    fine-tuning 4 steps by hand gives; it is cached apart from a plain screen."""
    from dataclasses import replace

    from pyprune.passes import constraint_hooks
    from pyprune.train import fine_tune

    base = tiny_base()
    quick = tiny_evaluator(screen_steps=4)
    plain = tiny_evaluator(journal=quick.journal)
    recovered, recalibrated = quick.screen(base, MASK, 0.8), plain.screen(base, MASK, 0.8)
    assert recovered.key != recalibrated.key and quick.measured == plain.measured == 1

    by_hand = plain.apply(base, [MASK.spec(0.8)])
    steps = []
    hooks = constraint_hooks(by_hand.passes(), by_hand.gm)
    hooks.after_step.append(lambda m: steps.append(1))
    config = replace(plain.settings.train, epochs=1.0, max_steps=4)
    fine_tune(by_hand.gm, plain.data.train, plain.data.mean, plain.data.std, config, hooks=hooks)
    assert len(steps) == 4
    assert recovered.accuracy == plain.accuracy(by_hand.gm, plain.data.screen)
    assert recovered.accuracy > recalibrated.accuracy  # the 80% cut recovers in 4 steps here
    weights = [by_hand.gm.get_submodule(n).weight for n in ("conv1", "conv2", "fc")]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))


@pytest.mark.parametrize("continue_lr", [None, 0.002])
def test_a_fine_tune_of_a_fine_tuned_model_runs_at_the_continuation_rate(fine_tunes, continue_lr):
    """First fine-tunes at --lr; a continuation (the parent was fine-tuned in this
    search) and the final recovery at --continue-lr, when given."""
    ev = tiny_evaluator(finetune_epochs=0.1, lr=0.05)
    ev.settings.continue_lr = continue_lr
    base = tiny_base()
    first = ev.finetune(ev.apply(base, ["mask(sparsity=0.5)"]), 0.1)
    second = ev.finetune(ev.apply(first, ["quant(bits=4)"]), 0.1)
    ev.finetune(second, 0.1, key=f"{second.key}>final(0.1)@ft")
    assert not base.tuned and first.tuned and second.tuned
    later = 0.05 if continue_lr is None else continue_lr
    assert [c.lr for c in fine_tunes] == [0.05, later, later]
