"""The extract stage and the feature store: exact, resumable after kill -9, refusing bad stores."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from builders import write_cifar, write_image_folder
from residual_core.datasets import load_dataset
from residual_core.engines.extract import extract
from residual_core.errors import DatasetNotFoundError, StoreError
from residual_core.formats.feature_store import FeatureStore
from residual_core.identity import EMBEDDED_MODEL, WeightsId
from residual_core.layout import Layout
from residual_core.method.decompose import RAW_FIELDS, decompose
from residual_core.method.models import load_model
from residual_core.stages.extract import Params as ExtractParams

BIN = Path(sys.executable).parent / "residual"


@pytest.fixture(scope="module")
def tiny():
    return load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), ["ant", "bee", "cow"], 30, size=40)


def run(tiny, dataset, split, root, **kw):
    """Extract with small chunks; ``kw``: extract() arguments and ExtractParams fields."""
    settings = {k: kw.pop(k) for k in list(kw) if k in ExtractParams.model_fields}
    params = ExtractParams(**{"batch_size": 8, "rows_per_chunk": 16, "num_workers": 0,
                              "device": "cpu", **settings})
    return extract(EMBEDDED_MODEL, None, dataset, split, params, store_root=root, loaded=tiny,
                   progress=False, **kw)


def direct(tiny, dataset, split, **kw):
    data = load_dataset(dataset, split, transform=tiny.preprocess, **kw)
    images = torch.stack([data[i][0] for i in range(len(data))])
    return data, decompose(tiny.model, images)


def test_store_equals_direct_decomposition(tiny, folder, tmp_path):
    name = f"imagefolder:{folder}"
    result = run(tiny, name, "train", tmp_path)
    assert result.computed_chunks == result.total_chunks > 1
    store = FeatureStore.open(result.url)
    data, dec = direct(tiny, name, "train")
    y = store.contributions().compute()
    assert y.shape == tuple(dec.contributions.shape)
    np.testing.assert_allclose(y, dec.contributions.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(store.labels, data.labels)
    np.testing.assert_array_equal(store.indices, data.indices)
    assert store.classnames == ["ant", "bee", "cow"]
    assert [u["name"] for u in store.attrs["units"]] == dec.unit_names
    # Any units, any order, any rows: the projection is exact on read.
    pick = ["L2H1", "emb", "L0.mlp", "L3H3", "L0H2"]
    idx = [dec.unit_names.index(p) for p in pick]
    rows = np.array([3, 0, 17, 40])
    np.testing.assert_allclose(store.contributions(pick, rows).compute(),
                               dec.contributions[rows][:, idx].numpy(), rtol=1e-5, atol=1e-6)
    # A unit named twice comes twice (emb included), in contributions and in the PCA.
    twice = ["emb", "L1H0", "emb", "L1.mlp", "L1H0"]
    idx = [dec.unit_names.index(p) for p in twice]
    np.testing.assert_allclose(store.contributions(twice, rows).compute(),
                               dec.contributions[rows][:, idx].numpy(), rtol=1e-5, atol=1e-6)
    once = store.pca(["emb", "L1H0", "L1.mlp"])
    for got, want in zip(store.pca(twice), [once[0], once[1], once[0], once[2], once[1]]):
        np.testing.assert_array_equal(got.eigenvalues, want.eigenvalues)
    # The zero-shot classifier is stored with the features.
    assert store.class_weights.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(store.class_weights, axis=1), 1, rtol=1e-5)


def test_complete_store_is_not_recomputed(tiny, folder, tmp_path):
    first = run(tiny, f"imagefolder:{folder}", "val", tmp_path)
    assert first.computed_chunks == first.total_chunks
    again = run(tiny, f"imagefolder:{folder}", "val", tmp_path)
    assert again.was_cached and again.rows_computed == 0


def test_cifar10_layout_through_the_cache(tiny, tmp_path):
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(tmp_path / "ds", "cifar-10-batches-py", files, "labels", "batches.meta",
                "label_names", n_classes=10, per_file=[20] * 5 + [10])
    result = run(tiny, "cifar10", "val", tmp_path / "st", data_root=tmp_path / "ds")
    store = FeatureStore.open(result.url)
    data, dec = direct(tiny, "cifar10", "val", data_root=tmp_path / "ds")
    assert len(data) == 10  # 10% of the 100 train images, stratified
    np.testing.assert_array_equal(store.labels, data.labels)
    np.testing.assert_allclose(store.contributions().compute(), dec.contributions.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert store.attrs["dataset"] == "cifar10" and store.attrs["split"] == "val"


def test_float16_storage_is_smaller_and_close(tiny, folder, tmp_path):
    """Both dtypes' stores of one split live side by side under one root."""
    name = f"imagefolder:{folder}"
    s32 = FeatureStore.open(run(tiny, name, "train", tmp_path).url)
    s16 = FeatureStore.open(run(tiny, name, "train", tmp_path, feature_dtype="float16").url)
    assert s16.url != s32.url and s16.url.endswith("train.float16.zarr")
    assert s16.group["heads"].dtype == np.float16 and s32.group["heads"].dtype == np.float32
    for dtype, store in (("float32", s32), ("float16", s16)):  # neither replaced the other
        assert run(tiny, name, "train", tmp_path, feature_dtype=dtype).was_cached
        assert FeatureStore.open(store.url).attrs["config_hash"] == store.attrs["config_hash"]
    y32, y16 = s32.contributions().compute(), s16.contributions().compute()
    rel = np.linalg.norm(y16 - y32, axis=-1) / np.linalg.norm(y32, axis=-1)
    assert rel.max() < 5e-3

    def size(url):
        return sum(f.stat().st_size for f in Path(url).rglob("c/**/*") if f.is_file())

    assert size(s16.url) < 0.75 * size(s32.url)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_kill_9_then_resume_gives_the_clean_store(tiny, tmp_path):
    folder = write_image_folder(tmp_path / "big", ["a", "b"], 700, size=32, seed=1)
    name = f"imagefolder:{folder}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN), "extract", "--model", EMBEDDED_MODEL, "--dataset", name, "--split", "train",
           "--store-root", str(tmp_path / "killed"), "--batch-size", "8", "--rows-per-chunk", "16",
           "--num-workers", "0", "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # the store's own path: a tree walk could race with its creation's rename into place
    store_path = Path(Layout.of(tmp_path / "killed").feature_store(
        WeightsId(EMBEDDED_MODEL), name, "train"))
    done_path = None
    deadline = time.time() + 180
    while time.time() < deadline:
        if (store_path / "done" / "zarr.json").exists():
            done_path = store_path
            done = zarr.open_group(str(done_path), mode="r")["done"][...]
            if 3 <= done.sum() < len(done) // 2:
                break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    writers = _writer_processes(proc.pid)  # the store is written: its writer has started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done_path is not None
    assert len(writers) == 1  # the CLI's writer process, which dies with it
    deadline = time.time() + 10
    while _writer_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _writer_processes(proc.pid)
    with pytest.raises(StoreError, match="incomplete"):
        FeatureStore.open(str(done_path))
    done_before = int(zarr.open_group(str(done_path), mode="r")["done"][...].sum())

    resumed = run(tiny, name, "train", tmp_path / "killed")
    assert resumed.url == str(done_path)
    assert resumed.computed_chunks == resumed.total_chunks - done_before
    clean = run(tiny, name, "train", tmp_path / "clean")
    a, b = FeatureStore.open(resumed.url).group, FeatureStore.open(clean.url).group
    for key in RAW_FIELDS + ("labels", "indices", "done", "maps/head_maps"):
        np.testing.assert_array_equal(a[key][...], b[key][...], err_msg=key)


def _writer_processes(parent: int) -> list[int]:
    """PIDs of the writer processes (residual_core.formats.row_chunks) of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"residual_core.formats.row_chunks" in argv and argv[argv.index(
                b"residual_core.formats.row_chunks") + 1] == str(parent).encode():
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_a_writer_process_writes_what_a_writer_thread_writes(tiny, folder, tmp_path):
    """The default writer process (local stores) gives a store bitwise identical to the writer
    thread's; a failed write in the child is one line in the parent; the child is gone after."""
    from residual_core.formats.row_chunks import WriterError, WriterProcess

    name = f"imagefolder:{folder}"
    stores = {w: FeatureStore.open(run(tiny, name, "test", tmp_path / w, writer=w,
                                       rows_per_chunk=4).url)
              for w in ("thread", "process")}
    assert stores["thread"].dims.row_chunk > 1
    a, b = stores["thread"].group, stores["process"].group
    for key in RAW_FIELDS + ("labels", "indices", "done"):
        np.testing.assert_array_equal(a[key][...], b[key][...], err_msg=key)
    assert not _writer_processes(os.getpid())
    with WriterProcess() as writer:
        deadline = time.time() + 10  # its command line is the module's once it has exec'ed
        while not _writer_processes(os.getpid()) and time.time() < deadline:
            time.sleep(0.01)
        (pid,) = _writer_processes(os.getpid())
        with pytest.raises(WriterError, match=r"^row chunk 0: \w+(Error|NotFound)\w*: .*$"):
            writer.write(str(tmp_path / "nothing.zarr"), 0, slice(0, 1),
                         {"labels": np.zeros(1, np.int64)})
    assert not _writer_processes(os.getpid()) and not Path(f"/proc/{pid}").exists()


def test_mismatched_config_is_an_error(tiny, folder, tmp_path):
    name = f"imagefolder:{folder}"
    run(tiny, name, "test", tmp_path)
    with pytest.raises(StoreError, match="rows_per_chunk"):
        run(tiny, name, "test", tmp_path, rows_per_chunk=32)
    other = load_model(EMBEDDED_MODEL, None, device="cpu", seed=0)
    ckpt = tmp_path / "w.pt"
    torch.save(other.model.state_dict(), ckpt)
    # Same weights under another identity (a checkpoint) get their own store, never a mix.
    res = extract(EMBEDDED_MODEL, str(ckpt), name, "test",
                  ExtractParams(batch_size=8, rows_per_chunk=16, num_workers=0, device="cpu"),
                  store_root=tmp_path, progress=False)
    assert "ckpt-" in res.url and res.computed_chunks == res.total_chunks


def test_truncated_chunk_is_detected_and_repaired(tiny, folder, tmp_path):
    name = f"imagefolder:{folder}"
    result = run(tiny, name, "train", tmp_path)
    before = FeatureStore.open(result.url).contributions().compute()
    shard = sorted(Path(result.url, "heads", "c").rglob("*"))
    shard = [p for p in shard if p.is_file()][1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StoreError, match="corrupt"):
        FeatureStore.open(result.url).contributions().compute()
    repaired = run(tiny, name, "train", tmp_path, verify=True)
    assert repaired.computed_chunks == 1
    np.testing.assert_array_equal(FeatureStore.open(result.url).contributions().compute(), before)


def test_foreign_and_missing_stores(tmp_path):
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(tmp_path / "nothing.zarr")
    foreign = zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w")
    foreign.create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="not a residual feature store"):
        FeatureStore.open(tmp_path / "foreign.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(StoreError):
        FeatureStore.open(tmp_path / "plain")


def test_missing_array_is_reported(tiny, folder, tmp_path):
    result = run(tiny, f"imagefolder:{folder}", "val", tmp_path)
    import shutil

    shutil.rmtree(Path(result.url) / "mlp")
    with pytest.raises(StoreError, match="lacks array 'mlp'"):
        FeatureStore.open(result.url)


def test_wrong_dataset_root(tiny, tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        run(tiny, "cifar10", "train", tmp_path, data_root=tmp_path / "nowhere")


def test_extraction_is_refused_while_the_store_is_held_alone(tiny, folder, tmp_path):
    """A verification or deletion holds the store lock exclusively (another open file of the
    same process conflicts like another process)."""
    from residual_core.formats.claims import store_claims

    name = f"imagefolder:{folder}"
    url = run(tiny, name, "val", tmp_path).url
    with store_claims(url) as other:
        other.hold_store(exclusive=True)
        with pytest.raises(StoreError, match="being written by another extraction"):
            run(tiny, name, "val", tmp_path)
    assert run(tiny, name, "val", tmp_path).was_cached


def test_unknown_unit_names(tiny, folder, tmp_path):
    store = FeatureStore.open(run(tiny, f"imagefolder:{folder}", "val", tmp_path).url)
    with pytest.raises(StoreError, match="unknown unit 'L9H0'"):
        store.contributions(["L9H0"])


def test_store_root_can_be_an_fsspec_url(tiny, folder):
    name = f"imagefolder:{folder}"
    result = run(tiny, name, "val", "memory://residual-test")
    assert result.url.startswith("memory://residual-test/features/")
    store = FeatureStore.open(result.url)
    data, dec = direct(tiny, name, "val")
    np.testing.assert_allclose(store.contributions().compute(), dec.contributions.numpy(),
                               rtol=1e-5, atol=1e-6)
    assert run(tiny, name, "val", "memory://residual-test").was_cached


def test_a_changed_label_mapping_makes_the_store_stale(tiny, tmp_path, monkeypatch):
    """Same images, same sample ids, other labels (a loader fix): never served from the cache."""
    from residual_core.datasets import DatasetInfo, register_dataset, registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registrations stay here
    images = torch.rand(12, 3, 16, 16)
    pos = np.arange(12)

    def register(labels):
        register_dataset("relabelled", lambda split, root, download: (
            list(zip(images, labels)), labels[pos], pos),
            DatasetInfo("relabelled", ["a", "b"], ["a photo of {}."]), overwrite=True)

    register(np.arange(12) % 2)
    run(tiny, "relabelled", "train", tmp_path)
    assert run(tiny, "relabelled", "train", tmp_path).was_cached
    register(1 - np.arange(12) % 2)  # the classes swapped
    with pytest.raises(StoreError, match=r"another configuration \(differs in: labels_sha1\)"):
        run(tiny, "relabelled", "train", tmp_path)


def test_reduced_precision_is_part_of_the_store_and_its_exactness_is_recorded(tiny, folder,
                                                                              tmp_path):
    """bf16 autocast for the backbone: another store (config hash), the raw form still in the
    storage dtype, and the store says how far its unit sums are from the forward passes."""
    name = f"imagefolder:{folder}"
    fp32 = FeatureStore.open(run(tiny, name, "val", tmp_path / "a").url)
    exact = fp32.attrs["exactness"]
    assert exact["precision"] == "fp32" and exact["rows"] > 0
    assert exact["sum_vs_forward"] < 1e-5 and exact["sum_vs_fp32_forward"] < 1e-5
    assert "precision" not in fp32.attrs["config"]  # fp32 stores keep the hash they had
    bf16 = FeatureStore.open(run(tiny, name, "val", tmp_path / "b", precision="bf16").url)
    check = bf16.attrs["exactness"]
    assert check["precision"] == "bf16" and bf16.attrs["config"]["precision"] == "bf16"
    # bf16 really ran (an error far above fp32's), and stays close to the fp32 forward
    assert 1e-4 < check["sum_vs_fp32_forward"] < 0.1, check
    assert bf16.attrs["config_hash"] != fp32.attrs["config_hash"]
    assert bf16.group["heads"].dtype == np.float32
    a, b = fp32.contributions().compute(), bf16.contributions().compute()
    assert 0 < np.abs(a - b).max() < 0.1 * np.abs(a).max()
    with pytest.raises(StoreError, match="differs in: precision"):
        run(tiny, name, "val", tmp_path / "a", precision="bf16")
