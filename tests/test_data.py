"""Datasets (digits, CIFAR-10/100 and CIFAR-10-C in their real file formats, imagefolder), tasks."""

import pickle

import numpy as np
import pytest
import torch
from cifar_files import cifar_arrays, write_cifar10, write_cifar10c, write_cifar100, write_pickle

from convpeft.data import build_task, corrupt, load_dataset
from convpeft.data.datasets import ImageDataset


# ----------------------------------------------------------------------------- digits
def test_digits_default_split():
    tr = load_dataset("digits", split="train")
    te = load_dataset("digits", split="test", seed=0)
    assert len(tr) + len(te) == 1797
    assert tr.images.shape[1:] == (3, 32, 32) and tr.images.dtype == torch.uint8
    x, y = tr[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray replicated to RGB
    # stratified: every class in the same proportion in both splits (within one image)
    for c in range(10):
        ntr, nte = int((tr.labels == c).sum()), int((te.labels == c).sum())
        assert abs(nte - 0.25 * (ntr + nte)) <= 1
    again = load_dataset("digits", split="test", seed=0)
    assert torch.equal(again.images, te.images) and torch.equal(again.labels, te.labels)
    other = load_dataset("digits", split="test", seed=1)
    assert not torch.equal(other.labels, te.labels)
    assert load_dataset("digits", split="train", resolution=16).images.shape[-2:] == (16, 16)


def test_batches_cover_dataset():
    te = load_dataset("digits", split="test", resolution=8)
    seen = torch.cat([y for _, y in te.batches(64, shuffle=True,
                                                generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(te.labels.tolist())
    xs = [x for x, _ in te.batches(100, drop_last=True)]
    assert all(x.shape[0] == 100 for x in xs) and len(xs) == len(te) // 100


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; use one of digits"):
        load_dataset("mnist", split="train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="val")


# ----------------------------------------------------------------------------- CIFAR files
# protocol 2 is the official release's; a copy re-saved by Python 3 is read as well
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_real_format(tmp_path, protocol):
    written = write_cifar10(tmp_path, protocol=protocol)
    tr = load_dataset("cifar10", split="train", data_root=tmp_path)
    te = load_dataset("cifar10", split="test", data_root=tmp_path / "cifar-10-batches-py")
    assert len(tr) == 20 and len(te) == 10 and tr.classes[0] == "airplane"
    data, labels = written["data_batch_2"]
    # rows are R(1024) G(1024) B(1024), row-major 32x32
    assert torch.equal(tr.images[4], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert tr.labels[4:8].tolist() == labels
    assert torch.equal(te.images[3, 1], torch.from_numpy(written["test_batch"][0][3, 1024:2048]
                                                         .reshape(32, 32)))
    small = load_dataset("cifar10", split="test", data_root=tmp_path, resolution=16)
    assert small.images.shape == (10, 3, 16, 16)


def test_cifar100_real_format(tmp_path):
    write_cifar100(tmp_path)
    tr = load_dataset("cifar100", split="train", data_root=tmp_path)
    assert len(tr) == 12 and tr.num_classes == 100 and tr.classes[7] == "c7"
    assert tr.labels.tolist() == cifar_arrays(12, 12, 100)[1]


def test_cifar_missing_files_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*missing.*test_batch"):
        (tmp_path / "cifar-10-batches-py").mkdir()
        (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
        load_dataset("cifar10", split="train", data_root=tmp_path)
    with pytest.raises(ValueError, match="needs data_root"):
        load_dataset("cifar100", split="train")


def test_cifar10c_official_npy(tmp_path):
    n = 3
    arr = np.stack([np.full((32, 32, 3), 10 * s + i, dtype=np.uint8)
                    for s in range(5) for i in range(n)])
    labels = np.tile(np.array([1, 2, 3], dtype=np.uint8), 5)
    folder = write_cifar10c(tmp_path, "fog", arr, labels)
    ds = load_dataset("cifar10c", split="test", data_root=tmp_path, corruption="fog", severity=4)
    assert ds.images.shape == (3, 3, 32, 32) and ds.info["source"] == str(folder)
    assert ds.images[:, 0, 0, 0].tolist() == [30, 31, 32] and ds.labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="severity must be an integer 1..5"):
        load_dataset("cifar10c", split="test", data_root=folder, corruption="fog", severity=6)


def test_cifar10c_generated_from_cifar10(tmp_path):
    write_cifar10(tmp_path)
    clean = load_dataset("cifar10", split="test", data_root=tmp_path)
    ds = load_dataset("cifar10c", split="test", data_root=tmp_path, corruption="contrast",
                      severity=2, seed=5)
    assert ds.info["source"] == "generated"
    assert torch.equal(ds.images, corrupt(clean.images, "contrast", 2, seed=5))
    assert torch.equal(ds.labels, clean.labels)
    with pytest.raises(FileNotFoundError, match="official CIFAR-10-C folder"):
        load_dataset("cifar10c", split="test", data_root=tmp_path / "nothing",
                     corruption="fog", severity=1)
    with pytest.raises(ValueError, match="unknown corruption"):
        load_dataset("cifar10c", split="test", data_root=tmp_path, corruption="x", severity=1)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    tr = load_dataset("imagefolder", split="train", data_root=tmp_path, resolution=16)
    te = load_dataset("imagefolder", split="test", data_root=tmp_path, resolution=16)
    assert tr.classes == ["cat", "dog"] and len(tr) == 8 and len(te) == 2
    assert tr.images.shape[1:] == (3, 16, 16)
    with pytest.raises(FileNotFoundError, match="imagefolder needs data_root"):
        load_dataset("imagefolder", split="train", data_root=tmp_path / "none")


# ----------------------------------------------------------------------------- tasks
def test_shift_task():
    t = build_task("shift", resolution=16, corruption="gaussian_noise", severity=3, few_shot=4)
    assert t.num_classes == t.source_num_classes == 10 and t.num_new_classes == 0
    assert len(t.target_train) == 40 and torch.bincount(t.target_train.labels).tolist() == [4] * 10
    # target test = the clean test images, corrupted
    assert torch.equal(t.target_test.labels, t.source_test.labels)
    assert not torch.equal(t.target_test.images, t.source_test.images)
    again = build_task("shift", resolution=16, corruption="gaussian_noise", severity=3, few_shot=4)
    assert torch.equal(again.target_train.images, t.target_train.images)
    mix = build_task("shift", resolution=16, corruption=["fog", "contrast"], severity=2)
    assert mix.corruption == ["fog", "contrast"]
    with pytest.raises(ValueError, match="severity must be an integer 1..5"):
        build_task("shift", resolution=16, severity=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        build_task("shift", resolution=16, corruption="rain")
    with pytest.raises(ValueError, match="unknown task"):
        build_task("drift")


def test_new_classes_split_disjoint_and_relabelled():
    t = build_task("new_classes", resolution=8, source_classes=[0, 2, 4], target_classes=[7, 9])
    assert t.source_num_classes == 3 and t.num_classes == 5 and t.num_new_classes == 2
    assert set(t.source_train.labels.tolist()) == {0, 1, 2}
    assert set(t.source_test.labels.tolist()) == {0, 1, 2}
    assert set(t.target_train.labels.tolist()) == {3, 4}
    assert set(t.target_test.labels.tolist()) == {3, 4}
    assert t.target_test.classes == ["0", "2", "4", "7", "9"]
    # the images really are the named classes: class "7" images == digits test images of 7
    te = load_dataset("digits", split="test", resolution=8)
    assert torch.equal(t.target_test.images[t.target_test.labels == 3], te.images[te.labels == 7])
    d = build_task("new_classes", resolution=8)
    assert d.source_classes == [0, 1, 2, 3, 4] and d.target_classes == [5, 6, 7, 8, 9]
    r = build_task("new_classes", resolution=8, replay_per_class=2, few_shot=3)
    assert torch.bincount(r.target_train.labels).tolist() == [2] * 5 + [3] * 5


@pytest.mark.parametrize("src,tgt,msg", [
    ([0, 1], [1, 2], "overlap on \\[1\\]"),
    ([], [1], "source_classes is empty"),
    ([0], [], "target_classes is empty"),
    ([0, 12], [1], "outside 0..9"),
])
def test_bad_class_splits(src, tgt, msg):
    with pytest.raises(ValueError, match=msg):
        build_task("new_classes", resolution=8, source_classes=src, target_classes=tgt)


def test_imagedataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), ["a"])


class _Payload:
    """Unpickling this runs code that creates ``marker`` - what a hostile CIFAR file under
    --data-root would do with a plain ``pickle.load``."""

    def __init__(self, marker, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        import builtins
        import os
        import subprocess

        if self.how == "os.system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "subprocess":
            return (subprocess.call, (["touch", self.marker],))
        return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("how", ["os.system", "subprocess", "builtins.eval"])
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta", "test_batch"])
def test_hostile_cifar_pickle_is_refused_and_never_runs(tmp_path, where, how):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    payload = _Payload(marker, how)
    pickle.loads(pickle.dumps(payload))  # the payload is real: a plain load makes the marker
    assert marker.exists()
    marker.unlink()
    write_pickle(tmp_path / "cifar-10-batches-py" / where,
                  {b"labels": [0], b"data": payload})
    with pytest.raises(ValueError, match=f"{where} is not a CIFAR python-release file "
                                         r"\(refused global [\w.]+\)"):
        for split in ("train", "test"):
            load_dataset("cifar10", split=split, data_root=tmp_path)
    assert not marker.exists()


def test_cifar_pickle_that_is_not_a_dict_is_refused(tmp_path):
    write_cifar10(tmp_path)
    write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", [1, 2, 3])
    with pytest.raises(ValueError, match="a list, expected a dict"):
        load_dataset("cifar10", split="test", data_root=tmp_path)
