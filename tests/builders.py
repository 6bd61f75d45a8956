"""Builders of small on-disk datasets in the layouts users have (shared by several test files)."""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar(root, folder, files, label_key, meta_file, meta_key, n_classes, per_file):
    """Pickled batches exactly as torchvision reads them; returns {file: (data, labels)}."""
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    written = {}
    for k, (file_name, n) in enumerate(zip(files, per_file)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(i + k) % n_classes for i in range(n)]
        with open(root / folder / file_name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[file_name] = (data, labels)
    with open(root / folder / meta_file, "wb") as f:
        pickle.dump({meta_key: [f"class{c}" for c in range(n_classes)]}, f)
    return written


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32,
                       seed: int = 0) -> Path:
    """``root/<class>/<i>.png``: textured RGB images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            noise = rng.integers(-60, 61, size=(size, size, 3))
            img = np.clip(base + noise + 10 * label, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:04d}.png")
    return root


def sample_crops(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """``n`` random square crops (side between ``size`` and 4×``size``, at most the photo's
    height) of scikit-learn's two bundled photographs (real images, offline); the model's
    preprocess resizes them."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs, shipped with sklearn
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        short = min(img.shape[:2])
        side = int(rng.integers(min(size, short // 2), min(4 * size, short) + 1))
        top = int(rng.integers(0, img.shape[0] - side + 1))
        left = int(rng.integers(0, img.shape[1] - side + 1))
        crops.append(Image.fromarray(img[top:top + side, left:left + side]))
    return crops


# ----------------------------------------------------------------------------------------------
# The paper datasets' real on-disk formats (what torchvision reads under the data root). Every
# writer puts every class in; images are tiny solid colours that encode (class, sample).


def pixel(label: int, i: int) -> tuple[int, int, int]:
    """The colour of sample ``i`` of class ``label`` (a decoded image tells where it came from)."""
    return (label % 256, (7 * i + label // 256) % 256, 200)


def _encode(fmt: str, colour: tuple[int, int, int], size: int = 8) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, fmt: str, label: int, i: int) -> None:
    """An 8x8 image of colour :func:`pixel` ``(label, i)`` at ``path``, in PIL format ``fmt``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(fmt, pixel(label, i)))


def write_idx(path: Path, array) -> None:
    """An uncompressed IDX file (the format torchvision's MNIST reads)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = np.array([0x0800 + array.ndim, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, per_class: dict[str, int]) -> dict[str, np.ndarray]:
    """``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; returns {part: labels}."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    written = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        labels = np.arange(10 * per_class[part]) % 10
        images = np.broadcast_to((labels * 20)[:, None, None], (len(labels), 28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[part] = labels
    return written


def write_svhn(root: Path, per_class: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``svhn/{train,test}_32x32.mat`` as the Stanford files are: ``X`` uint8 (32, 32, 3, N),
    ``y`` (N, 1) with digit 0 stored as 10. Returns {part: (images (N, 32, 32, 3), digits)}."""
    import scipy.io

    folder = root / "svhn"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for part in ("train", "test"):
        digits = rng.permutation(np.repeat(np.arange(10), per_class[part]))
        images = rng.integers(0, 256, size=(len(digits), 32, 32, 3), dtype=np.uint8)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(folder / f"{part}_32x32.mat",
                         {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})
        written[part] = (images, digits)
    return written


GTSRB_TEST_COLUMNS = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def write_gtsrb(root: Path, n_classes: int, per_class: dict[str, int]) -> dict[str, list]:
    """``gtsrb/GTSRB/Training/<00000..>/<track>_<image>.ppm`` (+ each class's ``GT-<class>.csv``),
    ``gtsrb/GTSRB/Final_Test/Images/<n>.ppm`` and ``gtsrb/GT-final_test.csv`` (``;``-separated,
    torchvision reads ``Filename`` and ``ClassId``), as the official archives extract.
    Returns {"test": class id of each CSV row, in order}."""
    base = root / "gtsrb"
    training = base / "GTSRB" / "Training"
    for c in range(n_classes):
        folder = training / f"{c:05d}"
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for i in range(per_class["train"]):
            name = f"{i // 5:05d}_{i % 5:05d}.ppm"  # tracks of images
            write_image(folder / name, "PPM", c, i)
            rows.append(f"{name};8;8;0;0;7;7;{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    rng = np.random.default_rng(2)
    test_ids = rng.permutation(np.repeat(np.arange(n_classes), per_class["test"])).tolist()
    rows = [GTSRB_TEST_COLUMNS]
    for j, c in enumerate(test_ids):
        write_image(base / "GTSRB" / "Final_Test" / "Images" / f"{j:05d}.ppm", "PPM", c, j)
        rows.append(f"{j:05d}.ppm;8;8;0;0;7;7;{c}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return {"test": test_ids}


def write_dtd(root: Path, classes: list[str], per_class: dict[str, int],
              partitions: int = 2) -> dict[str, list[str]]:
    """``dtd/dtd/images/<class>/<class>_<n>.jpg`` and ``dtd/dtd/labels/{train,val,test}<p>.txt``
    (lines ``<class>/<file>``) for partitions 1..``partitions``; partition ``p`` > 1 rotates which
    images are train/val/test, so that reading the wrong partition shows. Returns partition 1's
    {part: lines}."""
    data = root / "dtd" / "dtd"
    total = sum(per_class.values())
    lists: dict[int, dict[str, list[str]]] = {p: {s: [] for s in per_class} for p in
                                              range(1, partitions + 1)}
    for label, name in enumerate(classes):
        files = [f"{name}_{i:04d}.jpg" for i in range(total)]
        for i, f in enumerate(files):
            write_image(data / "images" / name / f, "JPEG", label, i)
        for p in lists:
            rotated = files[p - 1:] + files[:p - 1]
            start = 0
            for part, n in per_class.items():
                lists[p][part].extend(f"{name}/{f}" for f in rotated[start:start + n])
                start += n
    (data / "labels").mkdir(parents=True)
    for p, parts in lists.items():
        for part, lines in parts.items():
            (data / "labels" / f"{part}{p}.txt").write_text("\n".join(lines) + "\n")
    return lists[1]


def _cars_annotations(classes_1based: list[int], fnames: list[str]) -> np.ndarray:
    """A 1xN MATLAB struct array with the devkit's fields (bbox_*, class, fname)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    ann = np.empty((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for j, (c, f) in enumerate(zip(classes_1based, fnames)):
        ann[0, j] = (np.uint8(0), np.uint8(0), np.uint8(7), np.uint8(7), np.uint8(c), f)
    return ann


def write_stanford_cars(root: Path, classes: list[str],
                        per_class: dict[str, int]) -> dict[str, list[int]]:
    """``stanford_cars/{cars_train,cars_test}/<n>.jpg``, ``devkit/{cars_meta.mat,
    cars_train_annos.mat, cars_test_annos.mat}`` and ``cars_test_annos_withlabels.mat`` as the
    Stanford devkit has them (``class_names`` a 1x196 cell, ``annotations`` a 1xN struct with a
    1-based ``class``). Returns {part: 0-based label of each annotation, in order}."""
    import scipy.io

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(classes, dtype=object).reshape(1, -1)})
    rng = np.random.default_rng(3)
    written = {}
    for part in ("train", "test"):
        labels = rng.permutation(np.repeat(np.arange(len(classes)), per_class[part])).tolist()
        fnames = [f"{j + 1:05d}.jpg" for j in range(len(labels))]
        for j, (c, f) in enumerate(zip(labels, fnames)):
            write_image(base / f"cars_{part}" / f, "JPEG", c, j)
        ann = _cars_annotations([c + 1 for c in labels], fnames)
        if part == "train":
            scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": ann})
        else:
            scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": ann})
            keep = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname"]
            unlabelled = np.empty(ann.shape, dtype=[(f, "O") for f in keep])
            for f in keep:
                unlabelled[f] = ann[f]
            scipy.io.savemat(base / "devkit" / "cars_test_annos.mat", {"annotations": unlabelled})
        written[part] = labels
    return written


SUN397_SUBFOLDERS = {"indoor", "outdoor", "exterior", "interior", "public", "shop", "home",
                     "office", "vehicle", "natural", "urban", "cultivated", "wild"}


def sun397_path(classname: str) -> str:
    """The SUN397 folder of a prompt-file class name: ``/a/apartment_building/outdoor`` for
    "apartment building outdoor" (a last word like indoor/outdoor is a subfolder, as in SUN397)."""
    words = classname.split(" ")
    if len(words) > 1 and words[-1] in SUN397_SUBFOLDERS:
        folder = "_".join(words[:-1]) + "/" + words[-1]
    else:
        folder = "_".join(words)
    return f"/{folder[0]}/{folder}"


def write_sun397(root: Path, classes: list[str], per_class: int) -> dict[str, str]:
    """``SUN397/ClassName.txt`` (``/a/abbey`` lines, sorted by path as in the archive) and
    ``SUN397/<letter>/<class>[/<sub>]/sun_<random letters>.jpg``. Returns {file path relative to
    SUN397/: class name}."""
    base = root / "SUN397"
    base.mkdir(parents=True)
    paths = {c: sun397_path(c) for c in classes}
    (base / "ClassName.txt").write_text("\n".join(sorted(paths.values())) + "\n")
    rng = np.random.default_rng(4)
    written = {}
    for label, c in enumerate(classes):
        for i in range(per_class):
            name = "sun_" + "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 16)) + ".jpg"
            rel = f"{paths[c][1:]}/{name}"
            write_image(base / rel, "JPEG", label, i)
            written[rel] = c
    return written


def write_imagenet(root: Path, classes: list[str], per_class: dict[str, int]) -> list[str]:
    """``imagenet/meta.bin`` (what torchvision's ImageNet writes from the devkit: ``torch.save``
    of (wnid -> class-name tuple, wnid of each val image)),
    ``imagenet/train/<wnid>/<wnid>_<n>.JPEG`` and ``imagenet/val/<wnid>/ILSVRC2012_val_<n>.JPEG``.
    Wnids sort in class order, as the ILSVRC2012 class indices do. Returns the wnids."""
    import torch

    base = root / "imagenet"
    wnids = [f"n{1440764 + 1000 * k:08d}" for k in range(len(classes))]
    for label, wnid in enumerate(wnids):
        for i in range(per_class["train"]):
            write_image(base / "train" / wnid / f"{wnid}_{i}.JPEG", "JPEG", label, i)
    rng = np.random.default_rng(5)
    val_labels = rng.permutation(np.repeat(np.arange(len(classes)), per_class["test"]))
    for j, label in enumerate(val_labels):
        write_image(base / "val" / wnids[label] / f"ILSVRC2012_val_{j + 1:08d}.JPEG", "JPEG",
                     int(label), j)
    torch.save(({w: tuple(c.split(", ")) for w, c in zip(wnids, classes)},
                [wnids[label] for label in val_labels]), base / "meta.bin")
    return wnids
