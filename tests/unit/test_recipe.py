"""Recipes: every shipped recipe validates; bad recipes fail at validation naming line and fix."""

from pathlib import Path

import pytest

from moekit.recipe import RecipeError, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
GOOD = """\
name: t
workdir: out
seed: {{build: tiny-random}}
domains:
  code: {{data: ["{data}"]}}
mix: {{router: random}}
train: {{max_steps: 2, seq_len: 16}}
tune:
  loop: {{max_steps: 2, seq_len: 16}}
"""


def test_every_recipe_under_recipes_loads():
    assert len(RECIPES) >= 5
    for path in RECIPES:
        recipe = load_recipe(path)
        assert recipe.domains and recipe.workdir.is_absolute(), path


def _write(tmp_path: Path, text: str, edit: tuple[str, str] = ("", "")) -> Path:
    (tmp_path / "code.txt").write_text("def f():\n    return 1\n" * 20)
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(data=tmp_path / "code.txt").replace(*edit))
    return path


def test_good_recipe_and_overrides(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD), ["train.max_steps=7", "tune.loop.lr=0.5"])
    assert recipe.train.max_steps == 7 and recipe.tune.loop.lr == 0.5
    assert recipe.workdir == (tmp_path / "out").resolve()


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (("train: {max_steps", "trian: {max_steps"), ["recipe.yaml:7", "trian", "unknown key"]),
        (
            ("  loop: {max_steps", "  balanse: switch\n  loop: {max_steps"),
            ["recipe.yaml:9", "tune.balanse", "unknown key"],
        ),
        (("code.txt", "missing.txt"), ["recipe.yaml:5", "domains.code.data.0", "does not exist"]),
        (("tiny-random", "huge-random"), ["recipe.yaml:3", "seed.build"]),
    ],
)
def test_bad_recipes_name_the_line(tmp_path, edit, fragments):
    path = _write(tmp_path, GOOD, edit)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = f"{info.value.message} {info.value.hint}"
    for fragment in fragments:
        assert fragment in text, text
    assert not (tmp_path / "out").exists()  # nothing started


def test_bad_override(tmp_path):
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        load_recipe(_write(tmp_path, GOOD), ["train.max_steps"])
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(_write(tmp_path, GOOD), ["train.max_stepz=3"])


def test_a_centroid_router_needs_two_domains(tmp_path):
    """Caught before any work starts, not at the mix stage after the branches have trained."""
    with pytest.raises(RecipeError, match="centroid needs at least two domains"):
        load_recipe(_write(tmp_path, GOOD), ["mix.router=centroid"])
    assert load_recipe(_write(tmp_path, GOOD), ["mix.router=centroid", "stages=[seed,branch,train]"])
