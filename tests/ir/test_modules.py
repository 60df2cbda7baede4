import pytest
from torch import nn

from pyprune.ir import in_mode


@pytest.mark.parametrize("given", [True, False])
@pytest.mark.parametrize("wanted", [True, False])
def test_in_mode_switches_every_submodule_for_the_block_and_restores_after_a_raise(given, wanted):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout()).train(given)
    with in_mode(model, training=wanted) as inside:
        assert inside is model and all(m.training == wanted for m in model.modules())
    assert all(m.training == given for m in model.modules())
    with pytest.raises(RuntimeError, match="inside"), in_mode(model, training=wanted):
        raise RuntimeError("inside")
    assert all(m.training == given for m in model.modules())


def test_in_mode_gives_each_submodule_its_own_mode_back():
    frozen = nn.BatchNorm2d(4).eval()  # a caller's frozen statistics inside a training model
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.Dropout()).train()
    frozen.eval()
    for wanted in (True, False):
        with in_mode(model, training=wanted):
            assert frozen.training == wanted
        assert model.training and model[2].training and not frozen.training
