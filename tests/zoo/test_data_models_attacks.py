"""The evaluation harness: data plumbing, reference models and attacks."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medic_fast import data
from medic_fast.zoo import attacks, datasets, models
from medic_fast.capture import default_layers
from medic_fast.zoo.models import wrn_released_layers


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def _ids(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_make_loader_accepts_pair_dataset_and_loader():
    X, y = torch.randn(10, 2), torch.arange(10)
    pair = data.make_loader((X, y), batch_size=4)
    assert [len(b[1]) for b in pair] == [4, 4, 2] and _ids(pair) == list(range(10))
    assert _ids(data.make_loader(TensorDataset(X, y), batch_size=3)) == list(range(10))
    given = DataLoader(TensorDataset(X, y), batch_size=5)
    assert data.make_loader(given) is given
    with pytest.raises(TypeError, match="data must be"):
        data.make_loader([X, y, y])
    with pytest.raises(ValueError, match="same N"):
        data.make_loader((X, y[:3]))
    with pytest.raises(TypeError, match="integer"):
        data.make_loader((X, y.float()))
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader((X, y), batch_size=0)


def test_empty_data_and_batches_without_labels_are_refused():
    """A length-0 Dataset or DataLoader, or a loader giving no batch: a ValueError, not a bare
    StopIteration; dict or inputs-only batches: a TypeError saying what batches must be."""
    X, y = torch.randn(10, 2), torch.arange(10)
    empty = TensorDataset(X[:0], y[:0])
    for d in (empty, DataLoader(empty, batch_size=4)):
        with pytest.raises(ValueError, match="^data is empty: expected at least one sample, got "
                           "a TensorDataset of length 0$"):
            data.make_loader(d)
    short = DataLoader(TensorDataset(X, y), batch_size=16, drop_last=True)
    with pytest.raises(ValueError, match="^data gives no batch: expected at least one, got none"):
        data.first_batch(short)
    x0, y0 = data.first_batch((X, y), batch_size=4)
    assert torch.equal(x0, X[:4]) and torch.equal(y0, y[:4])
    dicts = DataLoader([{"x": a, "y": b} for a, b in zip(X, y)], batch_size=4)
    for bad, got in [(dicts, r"a dict with keys \['x', 'y'\] \(dict batches are not supported\)"),
                     (DataLoader(X, batch_size=4), r"a Tensor of shape \(4, 2\) \(inputs only\)"),
                     (DataLoader(TensorDataset(X), batch_size=4), "a list of length 1")]:
        with pytest.raises(TypeError, match=r"^data must yield \(inputs, labels, \.\.\.\) tuple "
                           f"batches, got {got}$"):
            data.first_batch(bad)
        with pytest.raises(TypeError, match="must yield"):
            next(data.labelled_batches(bad))


def test_check_labels_names_the_label_and_the_class_count():
    data.check_labels(torch.tensor([0, 9, 3]), 10)
    for label in (10, -2):
        with pytest.raises(ValueError, match=rf"^train: labels must be in \[0, 10\) for a model "
                           rf"with 10 classes, got label {label}$"):
            data.check_labels(torch.tensor([[0, 1], [label, 3]]), 10, "train")


def test_shuffle_is_seeded_per_epoch_and_shards_cover_the_data():
    X, y = torch.randn(10, 2), torch.arange(10)
    a = data.make_loader((X, y), batch_size=4, shuffle=True, seed=1)
    b = data.make_loader((X, y), batch_size=4, shuffle=True, seed=1)
    first = _ids(a)
    assert first == _ids(b) and sorted(first) == list(range(10))
    data.set_epoch(a, 1)
    assert _ids(a) != first and sorted(_ids(a)) == list(range(10))
    parts = [_ids(data.make_loader((X, y), batch_size=3, shard=(r, 3))) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))  # no padding: each sample once
    given = DataLoader(TensorDataset(X, y), batch_size=2)
    halves = [_ids(data.make_loader(given, shard=(r, 2))) for r in range(2)]
    assert sorted(sum(halves, [])) == list(range(10))


def test_split_is_stratified_disjoint_and_seeded():
    X, y = datasets.load_digits()
    parts = data.split(X, y, [0.6, 0.1, 0.3], seed=0)
    assert sum(len(p[1]) for p in parts) == len(y)
    for frac, (_, yp) in zip([0.6, 0.1, 0.3], parts):
        counts = torch.bincount(yp, minlength=10).float()
        assert ((counts - frac * torch.bincount(y).float()).abs() <= 1).all()
    rows = [tuple(r.flatten().tolist()) for p in parts for r in p[0]]
    assert len(set(rows)) == len(set(tuple(r.flatten().tolist()) for r in X))
    again = data.split(X, y, [0.6, 0.1, 0.3], seed=0)
    assert torch.equal(parts[1][1], again[1][1])
    assert not torch.equal(parts[1][1], data.split(X, y, [0.6, 0.1, 0.3], seed=1)[1][1])
    with pytest.raises(ValueError, match="fractions"):
        data.split(X, y, [0.7, 0.7])


def test_random_crop_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(data.RandomCropFlip(0)(x), x)
    torch.manual_seed(0)
    outs = [data.RandomCropFlip(1)(x) for _ in range(20)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)
    for o in outs:  # every crop is a shift of the original by at most one pixel
        for b in range(2):
            shifts = [torch.nn.functional.pad(x[b], (1, 1, 1, 1))[:, i:i + 4, j:j + 4]
                      for i in range(3) for j in range(3)]
            assert any(torch.equal(o[b], s) for s in shifts)
    flipped = data.RandomCropFlip(0, flip=True)(x.repeat(16, 1, 1, 1))
    assert any(torch.equal(f, x[0].flip(2)) for f in flipped[0::2])
    with pytest.raises(ValueError, match="images"):
        data.RandomCropFlip(1)(torch.randn(3, 4))


def test_bundled_data():
    X, y = datasets.load_digits()
    assert X.shape == (1797, 1, 8, 8) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert X.min() == 0 and X.max() == 1 and set(y.tolist()) == set(range(10))
    X, y = datasets.load_swiss_roll(600, n_classes=3, seed=1)
    assert X.shape == (600, 3) and torch.bincount(y).tolist() == [200, 200, 200]
    assert torch.allclose(X.mean(0), torch.zeros(3), atol=1e-5)
    _, yb = datasets.load_swiss_roll(600, n_classes=2, bands=6, seed=1)
    assert torch.bincount(yb).tolist() == [300, 300] and not torch.equal(yb, y.clamp(max=1))
    with pytest.raises(ValueError, match="bands"):
        datasets.load_swiss_roll(100, n_classes=3, bands=2)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,x,convbn", [
    (lambda: models.DigitsCNN(), torch.rand(2, 1, 8, 8), 6),
    (lambda: models.MLP(3, 2), torch.rand(2, 3), 0),
    (lambda: models.resnet18(10), torch.rand(2, 3, 32, 32), 40),
    (lambda: models.wrn16_1(10), torch.rand(2, 3, 32, 32), 28),
    (models.digits_resnet, torch.rand(2, 1, 8, 8), 18),
])
def test_models_forward_and_hookable_layers(make, x, convbn):
    m = make()
    assert m(x).shape[0] == 2
    assert len(default_layers(m)) == convbn
    assert not any(getattr(mod, "inplace", False) for mod in m.modules())


def test_reference_model_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(models.resnet18()) == 11_173_962  # the standard CIFAR ResNet-18
    assert count(models.digits_resnet()) == 77_754
    assert [n for n, _ in models.resnet18().named_children()][3:7] == [
        "layer1", "layer2", "layer3", "layer4"]  # torchvision's names
    with pytest.raises(ValueError, match="blocks"):
        models.ResNet(blocks=(), width=8)
    assert 170_000 < count(models.wrn16_1()) < 180_000
    assert len(models.MLP(widths=(8, 8, 8, 8)).layers) == 9  # 5 Linear + 4 ReLU
    wrn = models.wrn16_1()
    assert len(wrn_released_layers(wrn)) == 25
    assert set(wrn_released_layers(wrn)) <= set(default_layers(wrn))
    with pytest.raises(ValueError, match="depth"):
        models.WideResNet(depth=15)
    with pytest.raises(ValueError, match="channels"):
        models.DigitsCNN((4, 4))


# --------------------------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------------------------

def _images(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4


def test_badnets_poison_and_apply():
    X, y = _images()
    X0, y0 = X.clone(), y.clone()
    atk = attacks.BadNets(size=2)
    p = atk.poison(X, y, 0.25, target=1, seed=0)
    assert torch.equal(X, X0) and torch.equal(y, y0)  # inputs untouched
    assert len(p.index) == 10 and (y[p.index] != 1).all() and (p.y[p.index] == 1).all()
    rest = torch.ones(40, dtype=torch.bool)
    rest[p.index] = False
    assert torch.equal(p.X[rest], X[rest]) and torch.equal(p.y[rest], y[rest])
    patch = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert all(torch.equal(p.X[i, 0, 6:, 6:], patch) for i in p.index)
    assert torch.equal(p.X[p.index, :, :6], X[p.index, :, :6])
    assert not torch.equal(atk.poison(X, y, 0.25, 1, seed=1).index, p.index)
    stamped = attacks.BadNets(size=1, margin=2, value=0.5)(X)
    assert (stamped[:, 0, 5, 5] == 0.5).all() and torch.equal(stamped[:, 0, :5], X[:, 0, :5])
    with pytest.raises(ValueError, match="rate"):
        atk.poison(X, y, 0.0, 1)
    with pytest.raises(TypeError, match="target"):
        atk.poison(X, y, 0.1, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        attacks.BadNets(size=9).apply(X)
    with pytest.raises(ValueError, match="images"):
        atk.apply(torch.rand(3, 8))


def test_blend_and_sig():
    X, y = _images()
    blend = attacks.Blend(alpha=0.25, seed=3)
    out = blend(X)
    pattern = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, 0.75 * X + 0.25 * pattern)
    assert torch.equal(attacks.Blend(0.25, seed=3)(X), out)  # same pattern for the same seed
    with pytest.raises(ValueError, match="pattern"):
        blend(torch.rand(2, 3, 8, 8))
    sig = attacks.SIG(delta=0.1, frequency=2)
    flat = torch.full((1, 1, 8, 8), 0.5)
    wave = sig(flat)[0, 0]
    expected = 0.5 + 0.1 * torch.sin(2 * torch.pi * torch.arange(8) * 2 / 8)
    assert torch.allclose(wave, expected.expand(8, 8), atol=1e-6)
    assert sig(torch.ones(1, 1, 8, 8)).max() == 1  # clipped
    p = sig.poison(X, y, 0.1, target=2, seed=0)  # clean-label: target-class rows, labels kept
    assert len(p.index) == 4 and (y[p.index] == 2).all() and torch.equal(p.y, y)


def test_label_flip():
    X, y = torch.randn(30, 3), torch.arange(30) % 3
    atk = attacks.LabelFlip(source=1)
    p = atk.poison(X, y, 1 / 30, target=2, seed=0)
    assert len(p.index) == 1 and y[p.index] == 1 and p.y[p.index] == 2
    assert torch.equal(p.X, X) and torch.equal(atk(X), X)
    assert (y[attacks.LabelFlip().poison(X, y, 0.5, 0).index] != 0).all()
    with pytest.raises(ValueError, match="same class"):
        attacks.LabelFlip(source=2).poison(X, y, 0.1, 2)
    with pytest.raises(ValueError, match="no sample"):
        attacks.LabelFlip(source=5).poison(X, y, 0.1, 2)


def test_label_flip_copies():
    X, y = torch.randn(30, 3), torch.arange(30) % 3
    p = attacks.LabelFlip(source=1, copies=4).poison(X, y, 2 / 30, target=2, seed=0)
    # the victims stay as they were; 4 relabelled copies of each follow the originals
    assert len(p.index) == 2 and (y[p.index] == 1).all()
    assert torch.equal(p.X[:30], X) and torch.equal(p.y[:30], y)
    assert torch.equal(p.X[30:], X[p.index].repeat_interleave(4, 0))
    assert p.y.shape == (38,) and (p.y[30:] == 2).all() and p.y.dtype == y.dtype
    # the same victims as in place: the draw does not depend on copies
    assert torch.equal(p.index, attacks.LabelFlip(source=1).poison(X, y, 2 / 30, 2, 0).index)
    # victims are drawn at random (seeded), not always the same sample of the class
    drawn = {int(attacks.LabelFlip(source=1, copies=1).poison(X, y, 1 / 30, 2, s).index)
             for s in range(20)}
    assert len(drawn) > 3 and all(y[i] == 1 for i in drawn)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="copies"):
            attacks.LabelFlip(copies=bad)
