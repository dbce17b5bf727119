"""Image folders: labeled and unlabeled layouts, resizing and normalization against a
hand computation, subsets, loaders, and every bad-input error."""
import numpy as np
import pytest
import torch
from PIL import Image

from dcvit_engine.data import IMAGE_EXTENSIONS, ImageFolderData, load_image_folder, make_loader, sample_images

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def write_image(path, size=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def labeled(tmp_path):
    root = tmp_path / "labeled"
    for c, name in enumerate(["cat", "ant", "bee"]):  # sorted order: ant, bee, cat
        (root / name).mkdir(parents=True)
        for i in range(c + 2):
            write_image(root / name / f"{i}.png", seed=10 * c + i)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


@pytest.fixture
def flat(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(5):
        write_image(root / f"img{i}.{['png', 'jpg', 'bmp', 'PNG', 'webp'][i]}", seed=i)
    write_image(root / ".hidden.png", seed=99)
    return root


def test_labeled_folder_classes_and_labels(labeled):
    data = load_image_folder(labeled, 8, MEAN, STD)
    assert data.labeled and data.classes == ["ant", "bee", "cat"]
    assert len(data) == 2 + 3 + 4
    images, labels = data.tensors()
    assert images.shape == (9, 3, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    for path, label in zip(data.paths, data.labels):
        assert data.classes[label] == path.parent.name


def test_flat_folder_is_unlabeled_and_matches_hand_normalization(flat):
    data = load_image_folder(flat, (6, 9), MEAN, STD)
    assert not data.labeled and data.classes is None and len(data) == 5
    image, label = data[0]
    assert label == -1 and image.shape == (3, 6, 9)
    with Image.open(data.paths[0]) as pil:
        pixels = np.asarray(pil.convert("RGB").resize((9, 6), Image.BILINEAR), dtype=np.float64) / 255
    expected = (pixels - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(image.permute(1, 2, 0).double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_grayscale_and_labeled_false(labeled):
    data = load_image_folder(labeled, 8, 0.5, 0.25, labeled=False, in_chans=1)
    assert not data.labeled and len(data) == 9 and set(data.labels) == {-1}
    assert data[0][0].shape == (1, 8, 8)


def test_subset_is_seeded_and_sample_images(labeled):
    a = load_image_folder(labeled, 8, MEAN, STD, num_samples=4, seed=1)
    b = load_image_folder(labeled, 8, MEAN, STD, num_samples=4, seed=1)
    c = load_image_folder(labeled, 8, MEAN, STD, num_samples=4, seed=2)
    assert a.paths == b.paths and len(a) == 4
    assert a.paths != c.paths
    images = sample_images(labeled, 4, 8, MEAN, STD, seed=1)
    assert torch.equal(images, a.tensors()[0])


def test_loader_batches(labeled):
    data = load_image_folder(labeled, 8, MEAN, STD)
    batches = list(data.loader(batch_size=4, shuffle=True, seed=0))
    assert [len(x) for x, _ in batches] == [4, 4, 1]
    again = list(make_loader(data, batch_size=4, shuffle=True, seed=0))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(data, batch_size=0)


def test_missing_and_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 8)
    file = write_image(tmp_path / "a.png")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_image_folder(file, 8)


def test_empty_folder_names_extensions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files") as err:
        load_image_folder(tmp_path, 8)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)
    with pytest.raises(ValueError, match="one subfolder per class"):
        load_image_folder(tmp_path, 8, labeled=True)


def test_unreadable_and_truncated_images_are_named(flat):
    (flat / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        load_image_folder(flat, 8)
    (flat / "broken.png").unlink()
    good = (flat / "img0.png").read_bytes()
    (flat / "truncated.png").write_bytes(good[: len(good) // 2])
    data = load_image_folder(flat, 8)  # the header is intact
    index = [p.name for p in data.paths].index("truncated.png")
    with pytest.raises(ValueError, match="truncated.png is not a readable image"):
        data[index]


def test_too_few_images_and_bad_settings(flat, labeled):
    with pytest.raises(ValueError, match="asked for 6 images but .* holds only 5"):
        load_image_folder(flat, 8, num_samples=6)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        load_image_folder(flat, 8, num_samples=0)
    with pytest.raises(ValueError, match="img_size"):
        load_image_folder(flat, 0)
    with pytest.raises(ValueError, match="mean has 2 values"):
        load_image_folder(flat, 8, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be positive"):
        load_image_folder(flat, 8, std=0.0)
    with pytest.raises(ValueError, match="in_chans"):
        load_image_folder(flat, 8, in_chans=4)
    with pytest.raises(ValueError, match="labeled must be"):
        load_image_folder(flat, 8, labeled="yes")
    write_image(labeled / "stray.png")
    with pytest.raises(ValueError, match="both images and class subfolders"):
        load_image_folder(labeled, 8)
    assert len(ImageFolderData(labeled, 8, labeled=True)) == 9


def test_nonfinite_rows_and_the_shared_refusal():
    from dcvit_engine.data import check_finite, nonfinite_rows
    images = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    check_finite(images)  # finite: accepted
    images[1, 2, 3, 4], images[4, 0, 0, 0], images[4, 1, 0, 0] = float("nan"), float("inf"), -float("inf")
    assert nonfinite_rows(images) == 2 and nonfinite_rows(images[:0]) == 0
    with pytest.raises(ValueError, match="^2 of 6 images hold NaN or Inf values"):
        check_finite(images)
    outputs = torch.zeros(6, 10)
    outputs[5, 9] = float("nan")
    with pytest.raises(ValueError, match="^net gives NaN or Inf outputs on 1 of 6 images"):
        check_finite(torch.ones(6, 3, 4, 5), outputs, model="net")
