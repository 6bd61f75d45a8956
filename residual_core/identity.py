"""What names things: a model's weights, a dataset, a configuration. The one place they are parsed.

- :class:`WeightsId` names a model's weights (architecture, pretrained tag or checkpoint path,
  checkpoint content hash); :func:`parse_weights` makes one from the user's ``--model`` /
  ``--pretrained`` pair, hashing a checkpoint file once (memoised on path, size and mtime).
  A ``transformers`` model is named ``hf:HUB_ID`` or ``hf:DIR`` (:data:`HF_MODEL_PREFIX`,
  :func:`hf_model_dir`); its weights are the directory's files, hashed together.
- :class:`DatasetRef` names a dataset: a registered name (``cifar10``, ``world/color``),
  ``imagefolder:PATH`` or ``hf-dataset:SOURCE[?OPTIONS]`` (:class:`HfSource`);
  :func:`parse_dataset` is the one place those prefixes are parsed, and
  :meth:`DatasetRef.content_identity` fingerprints the files of a dataset given as files.
- :func:`config_hash` is the stable short hash of a JSON-able configuration; :func:`slug` makes
  a name path-safe.

This module imports neither torch nor zarr: the CLI, the grid and the tables use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from residual_core.errors import ResidualError

__all__ = ["EMBEDDED_MODEL", "FEATURE_DTYPES", "HF_DATASET_OPTIONS", "HF_DATASET_PREFIX",
           "HF_MODEL_PREFIX", "IMAGEFOLDER_PREFIX", "RANDOM_WEIGHTS", "WORLD_WEIGHTS",
           "DatasetRef", "HfSource", "WeightsId", "canonical_dataset", "canonical_model",
           "config_hash", "dir_sha256",
           "file_sha256", "files_identity", "hf_model_dir", "is_hf_model", "looks_like_path",
           "parse_dataset", "parse_weights", "slug"]

EMBEDDED_MODEL = "residual-tiny"
"""The embedded default architecture (its open_clip config ships in ``model_configs``)."""

IMAGEFOLDER_PREFIX = "imagefolder:"
"""Prefix of the generic dataset ``imagefolder:PATH``: ``PATH`` holds one folder of images per
class, or ``train/`` and ``test/`` (and optionally ``val/``) folders of that form; class names
are the sorted folder names (of ``train/``), used verbatim in the prompts. ``PATH`` is absolute,
relative to the current directory when it starts with ``.`` or ``~`` (``./pets``), or else a
folder under the dataset root (``imagefolder:pets`` is ``<data root>/pets``;
:func:`canonical_dataset`)."""

HF_DATASET_PREFIX = "hf-dataset:"
"""Prefix of a Hugging Face ``datasets`` dataset: ``hf-dataset:SOURCE[?KEY=VALUE&...]``.
``SOURCE`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` when it
starts with ``/``, ``.`` or ``~`` or has two ``/`` or more (relative to the current directory),
else a Hub id (``NAME`` or ``NAMESPACE/NAME``) read from the local ``datasets`` cache, offline.
Options (:data:`HF_DATASET_OPTIONS`): ``image=COLUMN``, ``label=COLUMN`` (default: the only
``Image`` and the only ``ClassLabel`` column), ``config=NAME`` (a Hub dataset's configuration)
and ``templates=NAME|default`` (whose prompt templates; default: those of the paper dataset the
last component of ``SOURCE`` names, e.g. ``tanganke/eurosat``, else ``a photo of a {}.``)."""

HF_MODEL_PREFIX = "hf:"
"""Prefix of a Hugging Face ``transformers`` model: ``hf:HUB_ID`` (e.g.
``hf:facebook/dinov2-large``, read from the local Hugging Face cache, never downloaded by this
tool) or ``hf:DIR``, a folder written by ``model.save_pretrained(DIR)`` (and
``processor.save_pretrained(DIR)``), when it starts with ``/``, ``.`` or ``~`` or is an existing directory. The weights are that folder's
files: stores name them by the folder's content hash."""

HF_DATASET_OPTIONS = ("image", "label", "config", "templates")
"""The options an ``hf-dataset:`` name may carry after ``?``."""

WORLD_WEIGHTS = "world"
"""``pretrained`` value of the embedded model meaning "pretrained on the synthetic world" (the
checkpoint the pretrain stage makes)."""

FEATURE_DTYPES = ("float32", "float16")
"""Storage dtypes of a feature store's raw features; the first is the default (its stores keep
the plain path ``<split>.zarr``, the others are ``<split>.<dtype>.zarr`` beside it)."""

RANDOM_WEIGHTS = "random"
"""How random (seeded) weights are named in paths and reports (``pretrained=None``)."""

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able configuration (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A path-safe name: ``world/color -> world-color-<hash>``; long or odd names get a hash
    suffix, and names made only of dots (``..``) never become a path component as they are."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")
    if clean != text or len(clean) > 64 or not clean.strip("."):
        clean = f"{clean[:48]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return clean


def looks_like_path(value: str) -> bool:
    """Whether a ``--pretrained`` value is meant as a file (not a tag), even if it is missing."""
    return os.sep in value or value.startswith(".") or value.endswith(_CHECKPOINT_SUFFIXES)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, streamed and memoised on (path, size, mtime): checkpoints can be GBs,
    and every store path and cache key of a checkpoint names it by this hash."""
    st = os.stat(path)
    return _file_sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsId:
    """What names a model's weights: in store attributes, config hashes, paths and table rows.

    ``pretrained`` is a pretrained tag, the absolute path of a checkpoint file (then
    ``checkpoint_sha256`` is its content hash), or ``None`` for seeded random weights.
    """

    model: str
    pretrained: str | None = None
    checkpoint_sha256: str | None = None

    FIELDS = ("model", "pretrained", "checkpoint_sha256")

    @property
    def slug(self) -> str:
        """The weights' path component: ``laion2b_s34b_b88k``, ``ckpt-<sha12>`` or ``random``."""
        if self.checkpoint_sha256:
            return f"ckpt-{self.checkpoint_sha256[:12]}"
        return slug(self.pretrained) if self.pretrained else RANDOM_WEIGHTS

    @property
    def label(self) -> str:
        """``name/tag``, ``name/<checkpoint file name>``, ``name/random`` or, for an ``hf:``
        model, its name (which holds its weights)."""
        if is_hf_model(self.model):
            return self.model
        weights = self.pretrained or RANDOM_WEIGHTS
        return f"{self.model}/{os.path.basename(weights) if os.sep in weights else weights}"

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "WeightsId":
        """The weights named by a store's (or a row's) ``model``/``pretrained``/``checkpoint_sha256``."""
        return cls(**{k: attrs.get(k) for k in cls.FIELDS})


def parse_weights(model: str, pretrained: str | os.PathLike | None) -> WeightsId:
    """The :class:`WeightsId` of ``--model M --pretrained P``: an existing file is a checkpoint
    (absolute path, content hash); anything else is a tag (checked when the model is loaded).

    An ``hf:`` model (:data:`HF_MODEL_PREFIX`) is named ``hf:HUB_ID`` or ``hf:/absolute/dir``;
    its ``pretrained`` is the folder its files are read from (a Hub id's cached snapshot) and
    its ``checkpoint_sha256`` their content hash (:func:`dir_sha256`). ``P`` must be None or
    that folder (what a store records)."""
    if is_hf_model(model):
        return _hf_weights(model, pretrained)
    if pretrained is None:
        return WeightsId(model)
    pretrained = str(pretrained)
    if os.path.isfile(pretrained):
        path = str(Path(pretrained).resolve())
        return WeightsId(model, path, file_sha256(path))
    return WeightsId(model, pretrained)


def is_hf_model(name: str) -> bool:
    """Whether ``name`` names a ``transformers`` model (``hf:...``)."""
    return str(name).startswith(HF_MODEL_PREFIX)


def canonical_model(name: str) -> str:
    """The one spelling of a model name: an ``hf:`` folder made absolute (``hf:./dino`` and
    ``hf:/abs/dino`` name one model); any other name as it is."""
    return _hf_source(name)[0] if is_hf_model(name) else name


def canonical_dataset(name: str, data_root: str | os.PathLike) -> str:
    """The one spelling of a dataset name: ``imagefolder:NAME`` with a bare relative path (not
    starting with ``/``, ``.`` or ``~``) is the folder ``NAME`` under the dataset root
    ``data_root``, spelled with its absolute path, so that every command and every worker reads
    the same folder; any other name as it is (``imagefolder:./pets`` stays relative to the
    current directory)."""
    if not name.startswith(IMAGEFOLDER_PREFIX):
        return name
    path = name[len(IMAGEFOLDER_PREFIX):]
    if not path or path.startswith(("/", ".", "~")):
        return name
    return IMAGEFOLDER_PREFIX + str((Path(data_root).expanduser() / path).resolve())


def _hf_source(name: str) -> tuple[str, Path | None]:
    """``(canonical name, folder)`` of ``hf:SOURCE``: a folder is made absolute; a Hub id keeps
    its name and has no folder until :func:`hf_model_dir` finds its cached snapshot."""
    source = name[len(HF_MODEL_PREFIX):].strip()
    if not source:
        raise ResidualError(f"{name!r} names no model: use hf:HUB_ID (e.g. "
                            "hf:facebook/dinov2-large) or hf:DIR (a save_pretrained folder)")
    path = Path(source).expanduser()
    if source.startswith(("/", ".", "~")) or path.is_dir():
        return HF_MODEL_PREFIX + str(path.resolve()), path.resolve()
    return HF_MODEL_PREFIX + source, None


_OFFLINE_FIX = ("on a machine with network access run `model.save_pretrained(DIR)` and "
                "`processor.save_pretrained(DIR)` (or `huggingface-cli download {id}` to fill "
                "the Hugging Face cache), then pass --model hf:DIR")


def hf_model_dir(name: str) -> Path:
    """The folder holding the files of ``hf:SOURCE``: the folder itself, or the Hub id's
    snapshot in the local Hugging Face cache (looked up offline; never downloaded).

    Raises:
        ResidualError: a folder that does not exist or has no ``config.json``.
        WeightsUnavailableError: a Hub id that is not in the local cache (the message says how
            to supply a local folder).
    """
    from residual_core.errors import WeightsUnavailableError

    canonical, path = _hf_source(name)
    if path is not None:
        if not path.is_dir():
            raise ResidualError(f"{name}: no such folder {path}; pass a folder written by "
                                "model.save_pretrained(DIR), or a Hub id (hf:NAMESPACE/NAME)")
        if not (path / "config.json").is_file():
            raise ResidualError(f"{name}: {path} has no config.json, so it is not a folder "
                                "written by model.save_pretrained(DIR)")
        return path
    hub_id = canonical[len(HF_MODEL_PREFIX):]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except HFValidationError:
        raise ResidualError(f"{name}: {hub_id!r} is neither a Hub id (NAMESPACE/NAME) nor an "
                            "existing folder") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise WeightsUnavailableError(
            f"{name}: the Hugging Face model {hub_id} is not in the local cache and this tool "
            f"never downloads one; {_OFFLINE_FIX.format(id=hub_id)}") from None


def dir_sha256(path: str | os.PathLike) -> str:
    """Content hash of a folder's files (names and contents; hidden files left out). A file of
    the Hugging Face cache that links to a blob named by its SHA-256 is named by that blob."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        real = Path(os.path.realpath(file))
        named = real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name)
        digest.update(f"{rel.as_posix()}\0{real.name if named else file_sha256(real)}\n"
                      .encode())
    return digest.hexdigest()


def _hf_weights(model: str, pretrained: str | os.PathLike | None) -> WeightsId:
    canonical, _ = _hf_source(model)
    folder = hf_model_dir(model)
    if pretrained is not None and Path(str(pretrained)).expanduser().resolve() != folder:
        raise ResidualError(
            f"{model} carries its weights in its name: --pretrained is not used with hf: models "
            f"(got {str(pretrained)!r}; its files are read from {folder})")
    return WeightsId(canonical, str(folder), dir_sha256(folder))


@dataclass(frozen=True)
class HfSource:
    """What ``hf-dataset:SOURCE[?OPTIONS]`` names (see :data:`HF_DATASET_PREFIX`).

    ``source``: the Hub id or the folder as written; ``path``: that folder (``~`` expanded), or
    ``None`` for a Hub id; the options are ``None`` where not given.
    """

    source: str
    path: Path | None = None
    image: str | None = None
    label: str | None = None
    config: str | None = None
    templates: str | None = None

    @property
    def short_name(self) -> str:
        """The last component of the source, lower case, ``-`` as ``_`` (``tanganke/eurosat``:
        ``eurosat``): what the prompt file's templates are looked up by."""
        last = self.source.rstrip("/").rsplit("/", 1)[-1]
        return last.lower().replace("-", "_")


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as the user names it: a registered name, ``imagefolder:PATH`` (``path``), or
    ``hf-dataset:SOURCE`` (``hf``; ``path`` is its folder when ``SOURCE`` is a folder)."""

    name: str
    path: Path | None = None
    hf: HfSource | None = None

    @property
    def is_files(self) -> bool:
        """A dataset given as files (its content, not its name, is its identity): an
        ``imagefolder:`` folder, or any ``hf-dataset:`` (a saved folder or cached Hub files)."""
        return self.path is not None or self.hf is not None

    @property
    def short_name(self) -> str:
        """What a user may type for this dataset in a query (``results --dataset``): a
        folder's last component (``imagefolder:/data/pets`` -> ``pets``), a Hub id's last part
        (``hf-dataset:tanganke/eurosat`` -> ``eurosat``), else the name itself."""
        if self.path is not None:
            return self.path.name
        if self.hf is not None:
            return self.hf.source.rstrip("/").rsplit("/", 1)[-1]
        return self.name

    @property
    def manifest_key(self) -> str | None:
        """What names the cached content manifest of a dataset given as files."""
        if self.hf is not None:
            return f"{HF_DATASET_PREFIX}{self.path if self.path is not None else self.hf.source}"
        return None if self.path is None else str(self.path)

    def content_identity(self, cache: str | os.PathLike | None = None) -> dict[str, Any] | None:
        """For a dataset given as files: a digest of its manifest (every file's relative path,
        size and content hash), so that an edited, added or removed image changes it; ``None``
        for a registered dataset (its name and split indices identify it).

        ``hf-dataset:``: the fingerprint and the content hash of the files of each split it
        reads (:func:`residual_core.datasets.hf.content_identity`).

        ``cache``: a JSON file of the hashes already computed, reused for files whose size and
        mtime did not change (a large folder is hashed once, then incrementally).
        """
        if self.hf is not None:
            from residual_core.datasets.hf import content_identity  # imports Hugging Face

            return content_identity(self, cache)
        if self.path is None:
            return None
        files = ((path.relative_to(self.path).as_posix(), path)
                 for path in sorted(p for p in self.path.rglob("*") if p.is_file()))
        return files_identity(files, cache)


def files_identity(files: Iterable[tuple[str, Path]], cache: str | os.PathLike | None = None,
                   ) -> dict[str, Any]:
    """``{"files": n, "sha256": digest}`` of ``(name, path)`` pairs: the digest covers each
    name, size and content hash, in the order given; hashes are reused from the manifest
    ``cache`` for files whose size and mtime did not change, and the manifest is rewritten with
    these files (a JSON ``{name: [size, mtime_ns, sha256]}``)."""
    known = _read_manifest(cache)
    manifest: dict[str, list] = {}
    digest = hashlib.sha256()
    for rel, path in files:
        st = path.stat()
        old = known.get(rel)
        sha = old[2] if old and old[:2] == [st.st_size, st.st_mtime_ns] else file_sha256(path)
        manifest[rel] = [st.st_size, st.st_mtime_ns, sha]
        digest.update(f"{rel}\0{st.st_size}\0{sha}\n".encode())
    if cache is not None and manifest != known:
        _write_manifest(cache, manifest)
    return {"files": len(manifest), "sha256": digest.hexdigest()}


def _read_manifest(cache: str | os.PathLike | None) -> dict[str, list]:
    try:
        return json.loads(Path(cache).read_text()) if cache is not None else {}
    except (OSError, ValueError):  # missing or damaged: hash again
        return {}


def _write_manifest(cache: str | os.PathLike, manifest: dict[str, list]) -> None:
    path = Path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)  # readers see the old or the new manifest, never half of one


def parse_dataset(name: str) -> DatasetRef:
    """The :class:`DatasetRef` of a dataset name (``imagefolder:`` and ``hf-dataset:`` folders
    are ``~``-expanded).

    Raises:
        ResidualError: an ``hf-dataset:`` name that is malformed (empty source, unknown or
            repeated option, an option without a value), in one line naming the fix.
    """
    if name.startswith(IMAGEFOLDER_PREFIX):
        return DatasetRef(name, Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser())
    if name.startswith(HF_DATASET_PREFIX):
        hf = _parse_hf(name)
        return DatasetRef(name, hf.path, hf)
    return DatasetRef(name)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_HF_SYNTAX = (f"{HF_DATASET_PREFIX}NAMESPACE/NAME or {HF_DATASET_PREFIX}/path/to/saved_dataset, "
              f"optionally followed by ?{'=...&'.join(HF_DATASET_OPTIONS)}=...")


def _parse_hf(name: str) -> HfSource:
    source, has_query, query = name[len(HF_DATASET_PREFIX):].partition("?")
    source = source.strip()
    if not source:
        raise ResidualError(f"dataset {name!r} names no dataset: write {_HF_SYNTAX}")
    options: dict[str, str] = {}
    for item in query.split("&") if has_query else ():
        key, has_value, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if key not in HF_DATASET_OPTIONS:
            raise ResidualError(f"dataset {name!r}: unknown option {key!r}; the options are "
                                f"{', '.join(HF_DATASET_OPTIONS)} (as in {_HF_SYNTAX})")
        if not has_value or not value:
            raise ResidualError(f"dataset {name!r}: option {key!r} needs a value ({key}=...)")
        if key in options:
            raise ResidualError(f"dataset {name!r}: option {key!r} is given twice; keep one")
        options[key] = value
    is_path = source.startswith(("/", ".", "~")) or source.count("/") >= 2
    if not is_path and not _HUB_ID.fullmatch(source):
        raise ResidualError(
            f"dataset {name!r}: {source!r} is neither a Hub id (NAME or NAMESPACE/NAME) nor a "
            f"folder (start a path with /, ./ or ~/): write {_HF_SYNTAX}")
    if is_path and "config" in options:
        raise ResidualError(f"dataset {name!r}: config= selects a configuration of a Hub "
                            "dataset; a saved folder has none: remove it")
    return HfSource(source, Path(source).expanduser() if is_path else None, **options)
