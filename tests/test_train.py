import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyprune.data import ArrayDataset, BatchLoader, Normalize
from pyprune.train import MemoizedTeacher, TrainConfig, TrainHooks, _fit_steps, bn_gamma_l1, distillation_loss, evaluate, fine_tune

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def tiny_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8),
                        torch.randint(0, 10, (n,), generator=g))


def config(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False, **kw})


def test_same_seed_same_weights():
    a, b = tiny_net(), tiny_net()
    fine_tune(a, tiny_data(), MEAN, STD, config(seed=3))
    fine_tune(b, tiny_data(), MEAN, STD, config(seed=3))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    c = tiny_net()
    fine_tune(c, tiny_data(), MEAN, STD, config(seed=4))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_matches_a_plain_pytorch_loop():
    """The engine is a plain loop: the same batches, the same SGD, the same result."""
    data, cfg = tiny_data(), config(epochs=1, augment=False, channels_last=False)
    engine = tiny_net()
    fine_tune(engine, data, MEAN, STD, cfg)
    plain = tiny_net()
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(plain.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(data, cfg.batch_size, Normalize(MEAN, STD), shuffle=True, seed=cfg.seed, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(loader))
    plain.train()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
        sched.step()
    for pa, pb in zip(engine.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(pa, pb)


STEP = 0.01  # the grid the straight-through tests project the conv's weights onto


def _onto_grid(weights: dict) -> None:
    weights["0"].copy_(torch.round(weights["0"] / STEP) * STEP)


class _StraightThrough(nn.Module):
    """The textbook straight-through estimator as a parametrization: the layer uses
    the projection of its latent weight, and the gradient passes to the latent
    weight unchanged."""

    def forward(self, latent):
        return latent + (torch.round(latent / STEP) * STEP - latent).detach()


@pytest.mark.parametrize("zero_a_channel", [False, True], ids=["projection", "projection+after_step_edit"])
def test_projection_is_straight_through_training_of_latent_weights(zero_a_channel):
    """The engine's projections (latent weights swapped in for the optimizer step,
    projected after it) train what a straight-through parametrization trains with a
    plain loop. An after_step hook's edit (channel 0 set to zero) is an edit of the
    latent weights too, as zeroing the parametrization's latent weight is."""
    from torch.nn.utils import parametrize

    from pyprune.passes.constraints import Projection

    data, cfg = tiny_data(), config(epochs=2, lr=0.5, augment=False, channels_last=False)

    def zero_channel(model):
        with torch.no_grad():
            model[0].weight[0].zero_()

    engine = tiny_net()
    with torch.no_grad():
        engine[0].weight.copy_(torch.round(engine[0].weight / STEP) * STEP)
    start = {k: v.clone() for k, v in engine.state_dict().items()}
    hooks = TrainHooks(projections=[Projection(("0",), _onto_grid)], after_step=[zero_channel] if zero_a_channel else [])
    fine_tune(engine, data, MEAN, STD, cfg, hooks)

    plain = tiny_net()
    plain.load_state_dict(start)
    parametrize.register_parametrization(plain[0], "weight", _StraightThrough())
    latent = plain[0].parametrizations.weight.original
    torch.manual_seed(cfg.seed)
    opt = torch.optim.SGD(plain.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(data, cfg.batch_size, Normalize(MEAN, STD), shuffle=True, seed=cfg.seed, drop_last=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * len(loader))
    plain.train()
    for _ in range(2):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            opt.step()
            if zero_a_channel:
                with torch.no_grad():
                    latent[0].zero_()
            sched.step()

    torch.testing.assert_close(engine[0].weight, plain[0].weight.detach())
    assert torch.equal(engine[0].weight, torch.round(engine[0].weight / STEP) * STEP)  # on the grid after training
    assert not torch.equal(engine[0].weight, start["0.weight"])  # and it moved
    if zero_a_channel:
        assert torch.all(engine[0].weight[0] == 0)
    for name in ("1.weight", "1.bias", "1.running_mean", "5.weight", "5.bias"):
        torch.testing.assert_close(engine.state_dict()[name], plain.state_dict()[name])


def test_channels_last_trains_to_the_same_weights_up_to_rounding():
    a, b = tiny_net(), tiny_net()
    fine_tune(a, tiny_data(), MEAN, STD, config(channels_last=False))
    fine_tune(b, tiny_data(), MEAN, STD, config(channels_last=True))
    assert b[0].weight.is_contiguous()  # handed back in the default layout
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


def test_fractional_epochs_and_hooks_run_once_per_step():
    calls = {"backward": 0, "step": 0}
    hooks = TrainHooks(after_backward=[lambda m: calls.__setitem__("backward", calls["backward"] + 1)],
                       after_step=[lambda m: calls.__setitem__("step", calls["step"] + 1)])
    logs = fine_tune(tiny_net(), tiny_data(96), MEAN, STD, config(epochs=0.5), hooks)
    assert calls == {"backward": 2, "step": 2}  # 3 batches per epoch, half rounds up to 2
    assert len(logs) == 1 and logs[0].images_per_s > 0


def test_max_steps_cuts_the_run_and_anneals_over_the_steps_that_run():
    """8 epochs of 3 batches capped at 5 steps: 5 steps, and the same weights as a
    run whose epochs give exactly 5 steps (5/3 epochs: the cosine schedule has the
    same length)."""
    calls = []
    hooks = TrainHooks(after_step=[lambda m: calls.append(1)])
    capped, planned = tiny_net(), tiny_net()
    fine_tune(capped, tiny_data(96), MEAN, STD, config(epochs=8, max_steps=5), hooks)
    assert len(calls) == 5
    fine_tune(planned, tiny_data(96), MEAN, STD, config(epochs=5 / 3))
    assert all(torch.equal(a, b) for a, b in zip(capped.state_dict().values(), planned.state_dict().values()))
    with pytest.raises(ValueError, match="max_steps"):
        config(max_steps=0)


def test_fit_steps_by_hand():
    # 4 steps took 4 s, 1 s each from now on: 10 s fit 10 steps in all
    assert _fit_steps(total=40, done=4, elapsed=4.0, per_step=1.0, limit=10.0) == 10
    assert _fit_steps(total=8, done=4, elapsed=4.0, per_step=1.0, limit=10.0) == 8  # never more than planned
    assert _fit_steps(total=40, done=4, elapsed=12.0, per_step=1.0, limit=10.0) == 5  # always one more


def test_a_time_limit_cuts_the_steps_that_do_not_fit(monkeypatch):
    """One fake second per step: a 10 s limit on a 24-step run trains 10 steps (the
    pace is timed from the second step), each on a full batch; a limit that fits
    everything changes nothing, weight for weight."""
    clock = [0.0]
    monkeypatch.setattr("pyprune.train.time.perf_counter", lambda: clock[0])
    tick = TrainHooks(after_step=[lambda m: clock.__setitem__(0, clock[0] + 1.0)])
    data = tiny_data(96)  # 3 batches of 32 per epoch
    cut = tiny_net()
    logs = fine_tune(cut, data, MEAN, STD, config(epochs=8, max_seconds=10.0), tick)
    assert sum(log.images for log in logs) == 10 * 32 and len(logs) == 4
    roomy, plain = tiny_net(), tiny_net()
    fine_tune(roomy, data, MEAN, STD, config(epochs=8, max_seconds=1e6), tick)
    fine_tune(plain, data, MEAN, STD, config(epochs=8), tick)
    for pa, pb in zip(roomy.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="on_start"):
        fine_tune(tiny_net(), data, MEAN, STD, config(max_seconds=5.0), TrainHooks(on_start=[lambda n: None]))
    with pytest.raises(ValueError, match="max_seconds"):
        config(max_seconds=0.0)


def test_after_step_hook_keeps_a_mask_exact():
    net = tiny_net()
    mask = (torch.rand_like(net[0].weight) > 0.5).float()

    def apply_mask(model):
        with torch.no_grad():
            model[0].weight.mul_(mask)

    apply_mask(net)
    fine_tune(net, tiny_data(), MEAN, STD, config(), TrainHooks(after_step=[apply_mask]))
    assert torch.all(net[0].weight[mask == 0] == 0)
    assert torch.all(net[0].weight[mask == 1] != 0)


def test_bn_gamma_l1_adds_the_subgradient():
    net = tiny_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, -0.1, 3.0, 0.0, 1.0, -1.0]))
    net(torch.randn(4, 3, 8, 8)).sum().backward()
    plain = net[1].weight.grad.clone()
    bn_gamma_l1(1e-2)(net)
    torch.testing.assert_close(net[1].weight.grad, plain + 1e-2 * torch.sign(net[1].weight.detach()))


def test_slim_l1_shrinks_gammas():
    base, slim = tiny_net(), tiny_net()
    fine_tune(base, tiny_data(), MEAN, STD, config(epochs=3))
    fine_tune(slim, tiny_data(), MEAN, STD, config(epochs=3, slim_l1=0.05))
    assert slim[1].weight.abs().sum() < base[1].weight.abs().sum()


def test_evaluate_matches_direct_computation():
    net, data = tiny_net().eval(), tiny_data(70)
    result = evaluate(net, data, MEAN, STD, batch_size=32, progress=False)
    x = (data.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net(x)
    assert result.n == 70
    assert result.accuracy == pytest.approx((logits.argmax(1) == data.labels).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert torch.equal(result.predictions, logits.argmax(1))  # per image, in dataset order, across batches
    assert result.log_probs is None  # only when asked for
    logged = evaluate(net, data, MEAN, STD, batch_size=32, progress=False, log_probs=True).log_probs
    torch.testing.assert_close(logged, F.log_softmax(logits, dim=1), rtol=1e-5, atol=1e-6)


def test_evaluate_and_recalibrate_in_channels_last_match_nchw_and_hand_the_weights_back_nchw():
    from pyprune.train import recalibrate_bn

    data = tiny_data(70)
    plain, nhwc = tiny_net(), tiny_net()
    recalibrate_bn(plain, data, MEAN, STD, images=64, batch_size=16)
    recalibrate_bn(nhwc, data, MEAN, STD, images=64, batch_size=16, channels_last=True)
    torch.testing.assert_close(nhwc[1].running_mean, plain[1].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nhwc[1].running_var, plain[1].running_var, rtol=1e-4, atol=1e-5)
    a = evaluate(plain, data, MEAN, STD, batch_size=32, progress=False)
    b = evaluate(plain, data, MEAN, STD, batch_size=32, progress=False, channels_last=True)
    assert torch.equal(a.predictions, b.predictions) and b.loss == pytest.approx(a.loss, rel=1e-4)
    assert plain[0].weight.is_contiguous() and nhwc[0].weight.is_contiguous()


def test_bad_config():
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(slim_l1=-1)


def test_divergence_raises_instead_of_training_on_and_hands_both_models_back():
    from pyprune.train import DivergenceError

    model, teacher = tiny_net(), tiny_net(seed=1).eval()
    with pytest.raises(DivergenceError, match="diverged"):
        fine_tune(model, tiny_data(), (0.5,) * 3, (0.25,) * 3, config(lr=1e9, epochs=2, distill=0.5),
                  teacher=teacher)
    # as on a normal return: NCHW on the CPU (later passes slice the weights), the
    # teacher in the mode it was given in
    for m in (model, teacher):
        assert all(p.device.type == "cpu" and p.is_contiguous() for p in m.parameters())
    assert not teacher.training


def test_bn_recalibration_is_the_average_of_the_augmented_batch_statistics():
    from pyprune.train import recalibrate_bn

    data, mean, std = tiny_data(n=96), (0.5,) * 3, (0.25,) * 3
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(bn).eval()
    used = recalibrate_bn(model, data, mean, std, images=64, batch_size=16, seed=3)
    batches = [x for x, _ in BatchLoader(data.subset(slice(0, 64)), 16, Normalize(mean, std), augment=True, seed=3)]
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    expected_var = torch.stack([x.transpose(0, 1).reshape(3, -1).var(1, unbiased=True) for x in batches]).mean(0)
    assert used == 64 and not model.training and bn.momentum == 0.1
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)


def test_distillation_loss_is_the_hand_computed_mix_of_labels_and_soft_targets():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    weight, t = 0.3, 2.5

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    s, q = student.double().numpy(), teacher.double().numpy()
    hard = -np.mean(np.log(softmax(s))[np.arange(5), labels.numpy()])
    p_teacher, p_student = softmax(q / t), softmax(s / t)
    kl = np.mean(np.sum(p_teacher * (np.log(p_teacher) - np.log(p_student)), axis=1))
    expected = (1 - weight) * hard + weight * t * t * kl
    assert distillation_loss(student, teacher, labels, weight, t).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(student, teacher, labels, 0.0, t).item() == pytest.approx(hard, rel=1e-5)


def test_distillation_trains_towards_the_teacher_and_leaves_it_alone():
    data, teacher = tiny_data(), tiny_net(seed=1)
    with torch.no_grad():
        teacher[-1].bias.copy_(torch.linspace(3, -3, 10))  # a teacher with strong views of its own
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain, distilled = tiny_net(), tiny_net()
    fine_tune(plain, data, MEAN, STD, config(epochs=8))
    fine_tune(distilled, data, MEAN, STD, config(epochs=8, distill=1.0, distill_temperature=1.0), teacher=teacher)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())
    assert teacher.training  # as it was given

    def gap(model):  # KL divergence from the teacher's outputs, in eval mode
        x = torch.cat([x for x, _ in data.batches(96, MEAN, STD)])
        teacher.eval(), model.eval()
        with torch.no_grad():
            return F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                            reduction="batchmean").item()
    assert gap(distilled) < 0.5 * gap(plain)
    teacher.train()
    # no teacher, or weight 0: the same weights as plain training
    again = tiny_net()
    fine_tune(again, data, MEAN, STD, config(epochs=8, distill=0.0), teacher=teacher)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))


def test_a_memoized_teacher_answers_a_batch_it_has_seen_from_memory():
    teacher = tiny_net(seed=1).eval()
    memo = MemoizedTeacher(teacher, max_bytes=2 * 8 * 10 * 4)  # room for two batches of 8 outputs
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        expected = teacher(x)
        first, again = memo(x), memo(x.clone())
        assert torch.equal(first, expected) and torch.equal(again, expected)
        assert (memo.computed, memo.reused) == (1, 1)
        changed = x.clone()
        changed[3, 1, 2, 2] += 1e-3  # one value differs: another batch
        assert torch.equal(memo(changed), teacher(changed))
        assert torch.equal(memo(x.contiguous(memory_format=torch.channels_last)), expected)  # the same values
        assert (memo.computed, memo.reused) == (2, 2)
        memo(torch.randn(8, 3, 16, 16))  # a third batch: computed, not kept (max_bytes)
        assert memo.kept_bytes == 2 * 8 * 10 * 4
        third = torch.randn(8, 3, 16, 16)
        memo(third), memo(third)
        assert (memo.computed, memo.reused) == (5, 2)
    # autograd, or training mode (BatchNorm statistics would move), pass straight through
    memo(x)
    memo.train()
    with torch.no_grad():
        memo(x)
    assert (memo.computed, memo.reused) == (5, 2)


def test_fine_tuning_with_a_memoized_teacher_trains_the_same_weights():
    data, teacher = tiny_data(), tiny_net(seed=1)
    cfg = config(epochs=1, distill=0.5, seed=5)
    plain = tiny_net()
    fine_tune(plain, data, MEAN, STD, cfg, teacher=teacher)
    memo = MemoizedTeacher(teacher)
    for run in range(2):  # the second replays every batch from memory
        model = tiny_net()
        fine_tune(model, data, MEAN, STD, cfg, teacher=memo)
        assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    steps = 96 // 32
    assert (memo.computed, memo.reused) == (steps, steps)
    assert memo.teacher.training  # handed back in the mode it came in


def test_bad_distillation_settings_name_the_flag():
    with pytest.raises(ValueError, match="--distill must"):
        TrainConfig(distill=1.5)
    with pytest.raises(ValueError, match="--distill-temperature"):
        TrainConfig(distill_temperature=0)
