"""The embedded default as plain values (``world.default.embedded_default``), and the recipe applying
them to its own flags: the world's data always, the rest only where a flag still holds its default.

The world itself is not built here (``prepare_world`` is replaced): that is test_world.py's job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from _helpers import import_recipe

from clipood_plugin.world import default as world_default
from clipood_plugin.world.default import QUICK, EmbeddedDefault, EmbeddedTask, embedded_default
from clipood_plugin.world.images import CLASS_PROMPTS
from clipood_plugin.world.tiny_clip import MODEL_NAME


@pytest.mark.parametrize("quick", [False, True])
def test_embedded_default_returns_the_tasks_values(monkeypatch: pytest.MonkeyPatch, quick: bool) -> None:
    calls: list[tuple[EmbeddedTask, Any, bool]] = []

    def fake_world(task: EmbeddedTask, cache_dir: str | os.PathLike[str] | None = None, *,
                   progress: bool = True) -> dict[str, Any]:
        calls.append((task, cache_dir, progress))
        return {"weights": "w.safetensors", "train": "train-{0..1}.tar", "val": "val.tar",
                "test": {d: f"test-{d}.tar" for d in task.domains}, "classnames": "classnames.json"}

    monkeypatch.setattr(world_default, "prepare_world", fake_world)
    got = embedded_default(quick, "/cache", progress=False)
    task = QUICK if quick else EmbeddedTask()
    assert calls == [(task, "/cache", False)]
    assert (got.train_shards, got.classnames, got.model, got.pretrained, got.template) == (
        "train-{0..1}.tar", "classnames.json", MODEL_NAME, "w.safetensors", CLASS_PROMPTS)
    assert got.eval_shards == ("val=val.tar", *(f"{d}=test-{d}.tar" for d in task.sources),
                               *(f"{d}-heldout=test-{d}.tar" for d in task.held_out))
    assert got.hparams == dict(task.hparams) and got.output_name == "embedded-default"


DEFAULT = EmbeddedDefault(train_shards="world/train.tar", classnames="world/classnames.json",
                          eval_shards=("photo=p.tar", "sketch-heldout=s.tar"), model=MODEL_NAME,
                          pretrained="w.safetensors", template=CLASS_PROMPTS,
                          hparams={"lr": 1e-4, "total_steps": 300, "workers": 1})


def test_the_recipe_applies_the_values_where_flags_hold_their_defaults(tmp_path: Path) -> None:
    recipe = import_recipe()
    args = recipe.parse_args([])
    recipe.apply_embedded_default(args, DEFAULT)
    assert (args.train_shards, args.classnames, args.eval_shards) == (
        "world/train.tar", "world/classnames.json", ["photo=p.tar", "sketch-heldout=s.tar"])
    assert (args.model, args.pretrained, args.template) == (MODEL_NAME, "w.safetensors", list(CLASS_PROMPTS))
    assert (args.lr, args.total_steps, args.workers) == (1e-4, 300, 1)
    assert Path(args.output) == Path(recipe.build_parser().get_default("output")).parent / "embedded-default"

    config = tmp_path / "run.yaml"
    config.write_text("lr: 2.0e-5\n")  # a YAML value is the user's choice, not a flag default
    args = recipe.parse_args(["-c", str(config), "--model", "ViT-B-16", "--template", "simple_imagenet",
                              "--eval-shards", "mine=m.tar", "--workers", "3", "--output", str(tmp_path / "out")])
    recipe.apply_embedded_default(args, DEFAULT)
    assert (args.train_shards, args.classnames) == ("world/train.tar", "world/classnames.json")  # always
    assert (args.lr, args.workers, args.total_steps) == (2e-5, 3, 300)
    assert (args.model, args.pretrained, args.template) == ("ViT-B-16", None, "simple_imagenet")
    assert args.eval_shards == ["mine=m.tar"] and args.output == str(tmp_path / "out")
