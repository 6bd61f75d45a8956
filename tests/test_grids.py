"""Grids as data: the named grids are JSON files that say what the registries say; `residual grid
show` prints a template that loads back to the same grid; `residual grid validate` checks one."""

import json
import re

import pytest

from pipelines.cli import main
from pipelines.grid import NAMED_GRIDS, GridError, load_grid, named_grid_file
from residual_core.datasets import PAPER_DATASETS
from residual_core.identity import EMBEDDED_MODEL, WORLD_WEIGHTS
from residual_core.method.hf_models import PAPER_HF_MODELS
from residual_core.stages.align import DEFAULT_METHODS
from residual_core.world.rendering import TASKS


def test_named_grids_are_json_files_that_follow_the_registries():
    paper = json.loads(named_grid_file("paper").read_text())
    (open_clip, world) = paper["sweeps"]
    assert open_clip["datasets"] == list(PAPER_DATASETS) and open_clip["basis"] == "imagenet"
    # the paper's seven models: four open_clip, BLIP ViT-L, ViT-L/16 and DINOv2-L
    assert [m["name"] for m in open_clip["models"]][4:] == list(PAPER_HF_MODELS[:3])
    assert len(load_grid("paper").cells()) == 7 * 10 + len(TASKS)
    assert world == {"models": [{"name": EMBEDDED_MODEL, "pretrained": WORLD_WEIGHTS}],
                     "datasets": list(TASKS)}
    demo = json.loads(named_grid_file("demo").read_text())
    assert demo["sweeps"] == [world] and demo["align"]["methods"] == list(DEFAULT_METHODS)
    assert paper["align"]["methods"] == list(DEFAULT_METHODS)
    for name in NAMED_GRIDS:
        assert load_grid(name).name == name


@pytest.mark.parametrize("name", NAMED_GRIDS)
def test_grid_show_is_a_template_that_loads_back(name, capsys, tmp_path):
    assert main(["grid", "show", name]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert load_grid(shown) == load_grid(name)
    assert set(shown["align"]) == set(type(load_grid(name).align).model_fields)  # all of them
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(shown))
    assert main(["grid", "validate", str(path)]) == 0
    assert f"{len(load_grid(name).cells())} cells" in capsys.readouterr().out


def test_grid_validate_names_the_bad_field_in_one_line(capsys, tmp_path):
    grid = json.loads(named_grid_file("smoke").read_text())
    grid["align"]["epochs"] = -1
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(grid))
    assert main(["grid", "validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("residual: error: invalid grid") and "align.epochs" in line
    assert main(["grid", "show", "nope"]) == 2
    assert "unknown grid 'nope'" in capsys.readouterr().err


def test_align_lr_and_batch_size_per_method_in_a_grid():
    """A grid's ``align.lr`` / ``align.batch_size``: one value for every trained method or
    METHOD: VALUE; a bad method or value names the field."""
    base = {"sweeps": [{"models": [{"name": EMBEDDED_MODEL}], "datasets": ["world/color"]}]}
    grid = load_grid({**base, "align": {"lr": {"residual-star": 0.5, "linear": 0.002},
                                        "batch_size": 32}})
    assert grid.align.setting("lr", "residual-star") == 0.5
    assert grid.align.setting("lr", "coarse") is None  # its preset's
    assert grid.align.setting("batch_size", "coarse") == 32
    assert load_grid({**base, "align": {"lr": 0.1}}).align.setting("lr", "linear") == 0.1
    for bad, says in (({"lr": {"nope": 0.1}}, "align.lr: unknown method 'nope'"),
                      ({"lr": -1}, "align.lr: *: must be positive"),
                      ({"batch_size": {"linear": "big"}}, "align.batch_size: linear: 'big' is "
                                                          "not an integer")):
        with pytest.raises(GridError, match=re.escape(says)):
            load_grid({**base, "align": bad})
