"""``--download`` (``extract.download``): torchvision downloads what it can; a failed download (no
network: simulated, nothing is ever fetched here) and a dataset that cannot be downloaded are one
line saying where to put the files."""

import socket
import urllib.error

import pytest

from pipelines.cli import build_parser, main
from pipelines.grid import load_grid
from residual_core.datasets import load_dataset
from residual_core.errors import DatasetNotFoundError
from residual_core.identity import EMBEDDED_MODEL
from residual_core.stages.extract import Params


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloader fails as without network (``URLError`` from ``urlopen``), and
    any socket connection is recorded and refused."""
    from torchvision.datasets import utils

    attempts = []

    def unreachable(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(utils, "_get_redirect_url", unreachable)
    monkeypatch.setattr(utils, "_urlretrieve", unreachable)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"),
                                          ("mnist", "MNIST/raw"),  # mirrors: a RuntimeError
                                          ("eurosat", "eurosat/2750")])
def test_failed_download_says_where_to_put_the_files(name, folder, tmp_path, offline):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, "train", data_root=tmp_path, download=True)
    msg = one_line(e)
    assert f"dataset '{name}' could not be downloaded by torchvision" in msg
    assert f"place it yourself in {tmp_path / folder}" in msg
    assert "URLError" in msg or "Error downloading" in msg
    assert offline and all(isinstance(a, str) for a in offline)  # only the patched downloader


@pytest.mark.parametrize("name, folder", [("resisc45", "resisc45"),
                                          ("stanford_cars", "stanford_cars"),
                                          ("imagenet", "imagenet")])
def test_datasets_torchvision_cannot_download(name, folder, tmp_path, offline):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, "train", data_root=tmp_path, download=True)
    msg = one_line(e)
    assert f"dataset '{name}' cannot be downloaded by torchvision: place it in " \
           f"{tmp_path / folder}" in msg
    assert offline == []


def test_local_datasets_are_never_downloaded(tmp_path, offline):
    for name in (f"imagefolder:{tmp_path / 'missing'}", f"hf-dataset:{tmp_path / 'missing'}"):
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, "train", download=True)
        assert "are local files and are never downloaded" in one_line(e)
    assert offline == []


def test_download_is_a_run_only_option_of_the_cli_and_the_grid(tmp_path, offline, capsys):
    assert Params().download is False
    assert "download" not in Params(download=True).identity()  # not part of the stage's key
    grid = load_grid({"sweeps": [{"models": [{"name": EMBEDDED_MODEL}],
                                  "datasets": ["world/color"]}], "extract": {"download": True}})
    assert grid.extract.download is True
    extract = build_parser()._subparsers._group_actions[0].choices["extract"]
    assert "--download" in extract.format_help()

    argv = ["extract", "--model", EMBEDDED_MODEL, "--dataset", "cifar10", "--split", "train",
            "--data-root", str(tmp_path / "ds"), "--store-root", str(tmp_path / "st"),
            "--device", "cpu", "--num-workers", "0", "--quiet", "--download"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not be downloaded by torchvision" in err[0], err
    assert main([*argv[:-1], "--no-download"]) == 2  # without it: not found, and how to get it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0] and "--download" in err[0], err
