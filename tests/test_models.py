import operator

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from mdafx.data import ArrayDataset
from mdafx.models import ModelError, resnet_cifar, tiny_cnn, vgg_cifar
from mdafx.evaluation import confusion_report as evaluate, task_accuracy
from mdafx.training import train_classifier
from mdafx.errors import PreconditionError

FACTORIES = {
    "vgg": vgg_cifar,
    "vgg_half": lambda num_classes: vgg_cifar(num_classes, width=0.5),
    "resnet20": lambda num_classes: resnet_cifar(20, num_classes),
    "resnet8_w8": lambda num_classes: resnet_cifar(8, num_classes, width=8),
    "tiny": tiny_cnn,
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_traces_and_matches_eager(name, num_classes):
    torch.manual_seed(0)
    model = FACTORIES[name](num_classes=num_classes).eval()
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    x = torch.randn(2, 3, 32, 32)
    out = gm(x)
    assert out.shape == (2, num_classes)
    torch.testing.assert_close(out, model(x))
    # Only plain ops: every call is a module, torch.flatten or an add (MDA maps all exactly).
    fns = {n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert fns <= {torch.flatten, operator.add}


def test_vgg_flattens_spatial_map_into_first_linear():
    model = vgg_cifar()
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    assert first_linear.in_features == last_conv.out_channels * 2 * 2
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 0.9e6


def test_resnet20_structure():
    model = resnet_cifar(20)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19  # + fc = 20 weighted layers
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2  # downsampling shortcuts
    assert sum(p.numel() for p in model.parameters()) < 0.3e6
    with pytest.raises(ModelError, match="6n"):
        resnet_cifar(21)


def test_tiny_cnn_is_small():
    assert sum(p.numel() for p in tiny_cnn().parameters()) < 20_000


def _random_data(n=96, classes=4):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    imgs = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    imgs[..., 0] = np.clip(imgs[..., 0] // 2 + labels[:, None, None] * 40, 0, 255)  # learnable
    return ArrayDataset(imgs, labels, augment=True)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_cnn_trains_deterministically(channels_last):
    torch.set_num_threads(1)
    ds = _random_data()
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = train_classifier(tiny_cnn(4), ds, epochs=2, lr=0.05, batch_size=16,
                                 weight_decay=5e-4, seed=3, progress=False,
                                 label_smoothing=0.1, channels_last=channels_last)
        assert not model.training
        weights.append(model.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
        assert torch.isfinite(weights[0][k].float()).all()

    ds.augment = False
    acc, per_class, confusion = evaluate(model, ds.batches(32))
    assert confusion.shape == (4, 4) and confusion.sum() == len(ds)
    assert per_class.shape == (4,) and acc == pytest.approx(np.trace(confusion) / len(ds))


def test_task_accuracy_restricts_labels_and_logits():
    logits = torch.tensor([[9.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([2, 1, 1, 0])
    # Sample 0 is right only because class 0's logit is left out; sample 3 is not counted.
    assert task_accuracy(logits, labels, [1, 2]) == pytest.approx(2 / 3)
    assert task_accuracy(logits.numpy(), labels.numpy(), np.array([0])) == 1.0
    with pytest.raises(PreconditionError, match="no sample"):
        task_accuracy(logits, torch.tensor([1, 1, 1, 1]), [0, 2])
