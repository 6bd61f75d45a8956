"""Feature store integrity: damage is repaired bitwise or refused in one line, never silent;
an interrupted creation never wedges a store; deleting a store respects the writer lock."""

import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from builders import write_image_folder
from residual_core.datasets import load_dataset
from residual_core.engines.extract import extract
from residual_core.errors import ResidualError, StoreError
from residual_core.formats.feature_store import SCHEMA, FeatureStore
from residual_core.identity import EMBEDDED_MODEL, WeightsId
from residual_core.layout import Layout
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams


@pytest.fixture(scope="module")
def tiny():
    return load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), ["ant", "bee", "cow"], 16, size=40)


@pytest.fixture(scope="module")
def name(folder):
    return f"imagefolder:{folder}"


def run(tiny, dataset, root, split="train", **kw):
    """Extract with small chunks; ``kw``: extract() arguments and ExtractParams fields."""
    settings = {k: kw.pop(k) for k in list(kw) if k in ExtractParams.model_fields}
    params = ExtractParams(**{"batch_size": 8, "rows_per_chunk": 16, "num_workers": 0,
                              "device": "cpu", **settings})
    return extract(EMBEDDED_MODEL, None, dataset, split, params, store_root=root, loaded=tiny,
                   progress=False, **kw)


def feature_store_url(model, pretrained, dataset, split, root) -> str:
    return Layout.of(root).feature_store(WeightsId(model, pretrained), dataset, split)


@pytest.fixture(scope="module")
def clean(tiny, name, tmp_path_factory):
    """One clean extraction (train split: 3 row chunks, the last one partial)."""
    root = tmp_path_factory.mktemp("clean")
    result = run(tiny, name, root)
    n = FeatureStore.open(result.url).dims.n
    assert result.total_chunks == 3 and n % 16
    return root, result.url


def copy_of(clean, tmp_path) -> tuple[Path, str]:
    root, url = clean
    shutil.copytree(root / "features", tmp_path / "features")
    return tmp_path, str(tmp_path / Path(url).relative_to(root))


def assert_same_store(url, reference):
    """Every array of the store equals the reference's (NaN-aware), and it opens as complete."""
    got, want = FeatureStore.open(url).group, zarr.open_group(reference, mode="r")
    for key in SCHEMA:
        np.testing.assert_array_equal(got[key][...], want[key][...], err_msg=key)


def chunk_files(url, array) -> list[Path]:
    return sorted(p for p in Path(url, array, "c").rglob("*") if p.is_file())


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def assert_one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc) and str(exc), repr(exc)


# ------------------------------------------------------------------------ repair by verify
def test_repaired_chunk_equals_a_clean_extraction_in_every_array(tiny, name, clean, tmp_path):
    root, url = copy_of(clean, tmp_path)
    damage(chunk_files(url, "heads")[1], "flip")
    repaired = run(tiny, name, root, verify=True)
    assert repaired.computed_chunks == 1
    assert_same_store(url, clean[1])
    data = load_dataset(name, "train", transform=tiny.preprocess)
    np.testing.assert_array_equal(FeatureStore.open(url).labels, data.labels)
    np.testing.assert_array_equal(FeatureStore.open(url).indices, data.indices)


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("array", list(SCHEMA))
def test_damage_to_any_array_is_repaired_by_verify_or_refused(tiny, name, clean, tmp_path,
                                                              array, how):
    root, url = copy_of(clean, tmp_path)
    files = chunk_files(url, array)
    assert files, array
    damage(files[-1], how)  # row arrays: the last, partial row chunk (rewritten in place)
    try:
        run(tiny, name, root, verify=True)
    except StoreError as exc:
        assert_one_line(exc)
        return
    assert_same_store(url, clean[1])


def test_labels_are_checked_against_the_dataset(tiny, name, clean, tmp_path):
    root, url = copy_of(clean, tmp_path)
    group = zarr.open_group(url, mode="r+")
    labels = group["labels"][...]
    labels[20] = (labels[20] + 1) % 3  # readable, plausible, wrong
    group["labels"][...] = labels
    assert run(tiny, name, root, verify=True).computed_chunks == 1
    assert_same_store(url, clean[1])


def test_reading_a_corrupt_fixed_array_is_a_store_error(clean, tmp_path):
    _, url = copy_of(clean, tmp_path)
    damage(chunk_files(url, "maps/head_maps")[0], "flip")
    damage(chunk_files(url, "labels")[0], "flip")
    store = FeatureStore.open(url)
    for read in (lambda: store.maps, lambda: store.labels):
        with pytest.raises(StoreError, match="verify") as err:
            read()
        assert_one_line(err.value)


def test_corrupt_done_array_without_verify_is_a_one_line_error(tiny, name, clean, tmp_path):
    root, url = copy_of(clean, tmp_path)
    damage(chunk_files(url, "done")[0], "flip")
    with pytest.raises(StoreError, match="done.*verify") as err:
        run(tiny, name, root)
    assert_one_line(err.value)
    run(tiny, name, root, verify=True)
    assert_same_store(url, clean[1])


def test_store_without_dims_attribute_is_a_one_line_error(tiny, name, clean, tmp_path):
    root, url = copy_of(clean, tmp_path)
    group = zarr.open_group(url, mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != "dims"})
    for attempt in (lambda: FeatureStore.open(url), lambda: run(tiny, name, root, verify=True)):
        with pytest.raises(StoreError, match="dims") as err:
            attempt()
        assert_one_line(err.value)


# ------------------------------------------------------------------------ interrupted creation
def test_store_killed_during_creation_is_recreated(tiny, name, clean, tmp_path):
    url = feature_store_url(EMBEDDED_MODEL, None, name, "train", tmp_path)
    # What a kill right after the group was created leaves: a group, no attributes, some arrays.
    wedged = zarr.open_group(url, mode="w")
    wedged.create_array("heads", shape=(72, 4, 4, 16), dtype="f4")
    wedged.create_array("done", shape=(5,), dtype="u1", fill_value=0)
    leftover = Path(f"{url}.creating-{uuid.uuid4().hex[:12]}")
    zarr.open_group(str(leftover), mode="w", attributes={"state": "creating"})
    result = run(tiny, name, tmp_path)
    assert result.url == url and result.computed_chunks == result.total_chunks
    assert_same_store(url, clean[1])
    assert not leftover.exists()
    assert [p.name for p in Path(url).parent.iterdir() if ".creating-" in p.name] == []


def test_a_successful_creation_leaves_no_temporary_sibling(tiny, name, tmp_path):
    url = run(tiny, name, tmp_path, split="val").url
    assert sorted(p.name for p in Path(url).parent.iterdir()) == ["val.zarr", "val.zarr.lock"]


@pytest.mark.parametrize("attributes", [{"state": "creating"}, None])
def test_fsspec_store_killed_during_creation_is_recreated(tiny, name, clean, attributes):
    root = f"memory://wedged-{uuid.uuid4().hex[:8]}"
    url = feature_store_url(EMBEDDED_MODEL, None, name, "train", root)
    wedged = zarr.open_group(url, mode="w", attributes=attributes)
    wedged.create_array("labels", shape=(72,), dtype="i8", fill_value=0)
    result = run(tiny, name, root)
    assert result.computed_chunks == result.total_chunks
    assert_same_store(url, clean[1])


def test_foreign_group_at_the_store_path_is_refused_not_deleted(tiny, name, tmp_path):
    url = feature_store_url(EMBEDDED_MODEL, None, name, "train", tmp_path)
    foreign = zarr.open_group(url, mode="w")
    foreign.create_array("mine", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="not a residual feature store"):
        run(tiny, name, tmp_path)
    assert "mine" in zarr.open_group(url, mode="r")


@pytest.mark.parametrize("bad", [{"rows_per_chunk": 0}, {"rows_per_chunk": -16},
                                 {"batch_size": 0}, {"batch_size": -8}])
def test_invalid_chunking_is_refused_before_anything_is_written(tiny, name, tmp_path, bad):
    with pytest.raises(ResidualError, match=next(iter(bad))) as err:
        run(tiny, name, tmp_path / "st", **bad)
    assert_one_line(err.value)
    assert not (tmp_path / "st").exists()
    assert run(tiny, name, tmp_path / "st", split="val").computed_chunks > 0


# ------------------------------------------------------------------------ remove_store
def test_remove_store_refuses_while_an_extraction_holds_the_lock(tiny, name, tmp_path):
    from residual_core.engines.extract import remove_store
    from residual_core.formats.claims import store_claims

    url = run(tiny, name, tmp_path, split="val").url
    held, release = threading.Event(), threading.Event()

    def writer():  # a part writing the store holds the store lock shared
        with store_claims(url) as claims:
            claims.hold_store(exclusive=False)
            held.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(StoreError, match="being written by another extraction") as err:
            remove_store(url)
        assert_one_line(err.value)
        assert FeatureStore.open(url).complete
    finally:
        release.set()
        thread.join()
    remove_store(url)
    assert not Path(url).exists()
    remove_store(url)  # nothing there: nothing to do
    assert run(tiny, name, tmp_path, split="val").computed_chunks > 0


def test_remove_store_deletes_an_fsspec_store(tiny, name):
    from residual_core.engines.extract import remove_store

    root = f"memory://remove-{uuid.uuid4().hex[:8]}"
    url = run(tiny, name, root, split="val").url
    remove_store(url)
    with pytest.raises(StoreError):
        FeatureStore.open(url)
    assert run(tiny, name, root, split="val").computed_chunks > 0


def test_remove_store_refuses_what_is_not_a_feature_store(tmp_path):
    from residual_core.engines.extract import remove_store

    other = tmp_path / "results.zarr"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a residual feature store") as err:
        remove_store(str(other))
    assert_one_line(err.value)
    assert (other / "notes.txt").exists()
