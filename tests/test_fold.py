import pytest
import torch
from torch import nn

from anomap._fold import fold_batchnorm
from anomap.backbones import _network, backbone_names

from conftest import assert_close_scaled


def randomize_batchnorm(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=gen))
            m.bias.data.copy_(torch.randn(n, generator=gen))


@pytest.mark.parametrize("name", backbone_names())
def test_folding_keeps_every_network_output(name):
    net = _network(name, "random").eval()
    randomize_batchnorm(net)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)
        folded = fold_batchnorm(net)
        after = folded(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert_close_scaled(after, before)
