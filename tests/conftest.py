"""Test-wide settings: no network, small thread pools, temporary Prefect and data roots."""

import atexit
import json
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect reads its settings on first import: give the whole session a temporary home (never the
# user's ~/.prefect) and ephemeral mode (no PREFECT_API_URL); its temporary server starts slowly
# on a busy 2-core machine.
_PREFECT_HOME = tempfile.mkdtemp(prefix="residual-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ.update({"PREFECT_HOME": _PREFECT_HOME, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
os.environ.pop("PREFECT_API_URL", None)

import pytest
import torch

# Under pytest-xdist (`make test` runs `-n 2`) the cores are shared between the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def custom_config(tmp_path):
    """Register an open_clip config (tiny tower + overrides) under a new name; returns the name."""
    import open_clip

    import residual_core.method.models  # noqa: F401  (registers the tiny config)

    counter = {"n": 0}

    def make(**vision_overrides):
        counter["n"] += 1
        name = f"test-tower-{os.getpid()}-{id(tmp_path) % 10_000}-{counter['n']}"
        cfg = {
            "embed_dim": 48,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 24,
                           "patch_size": 8, **vision_overrides},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                         "layers": 1},
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
        return name

    return make
