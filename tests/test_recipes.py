"""Recipes: YAML files of pruner arguments, validated, round-tripping through pruner.to_recipe()."""

import pytest
import torch
from torch import nn

import prunekit as pk


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


RECIPES = [
    "sparsity: 0.9\ncriterion: magnitude\nscope: global\nschedule: {gradual: {start: 0, end: 20, every: 5}}\n",
    "granularity: '2:4'\nexclude: ['4']\n",
    "sparsity: 0.5\ngranularity: {block: [2, 4]}\nlayer_sparsity: {'0': 0.25}\n",
    "sparsity: 0.5\ncriterion: random\nseed: 3\nmin_kept: 2\nmask_gradients: true\n",
    "schedule: {iterative_per_round: {fraction: 0.2, rounds: 3, start: 10, every: 10}}\nexclude: [nn.ReLU]\n",
    "sparsity: 0.5\ngranularity: out_channel\nround_to: 4\nprune_only: width\n",
]


@pytest.mark.parametrize("text", RECIPES)
def test_a_recipe_builds_the_pruner_and_round_trips(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    example = {"example_inputs": torch.randn(2, 8)} if "out_channel" in text else {}
    pruner = pk.Pruner.from_recipe(mlp(), path, **example)
    again = pk.Pruner.from_recipe(mlp(), pruner.to_recipe(), **example)
    assert again.config == pruner.config
    for _ in range(40):
        pruner.step()
    assert pruner.masks


def test_recipe_values_match_the_arguments_they_name():
    pruner = pk.Pruner.from_recipe(mlp(), "sparsity: 0.9\nscope: global\nschedule: {gradual: {start: 0, end: 20}}\n")
    direct = pk.Pruner(mlp(), 0.9, scope="global", schedule=pk.Gradual(0, 20))
    assert pruner.config == direct.config


def test_overrides_replace_recipe_values_and_add_objects():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = pk.Pruner.from_recipe(model, {"sparsity": 0.9}, sparsity=0.5, optimizer=optimizer)
    assert pruner.sparsity_target == 0.5 and pruner.enforcer.optimizers == [optimizer]


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "sparsity: 0.5\ngranulrity: weight\n",
            r"line 2: unknown key 'granulrity'; valid keys are sparsity, criterion",
        ),
        ("sparsity: 0.5\nscope: wide\n", r"line 2: scope: Input should be 'local', 'global' or 'row'"),
        ("sparsity: 0.5\nscope: [wide\n", r"line 3: not valid YAML"),
        ("sparsity: 1.5\n", r"line 1: sparsity: Input should be less than 1"),
        ("sparsity: 0.5\ncriterion: magic\n", r"line 2: criterion 'magic' is not registered"),
        ("schedule: {gradual: {start: 0, ends: 3}}\n", r"line 1: schedule: .*not \['ends'\]"),
        ("granularity: {block: [1]}\n", r"granularity: "),
        ("- a\n- b\n", r"a mapping of pruner arguments"),
        ("calibration: {samples: 0}\n", r"calibration.samples"),
        ("exclude: [nn.NotAModule]\n", r"not a torch.nn module type"),
        ("sparsity: !!python/object/apply:os.system ['true']\n", r"not valid YAML"),
    ],
)
def test_bad_recipes_say_where_and_what(text, match):
    with pytest.raises(pk.RecipeError, match=match):
        pk.load_recipe(text)


def test_a_missing_recipe_file(tmp_path):
    with pytest.raises(pk.RecipeError, match="does not exist"):
        pk.load_recipe(tmp_path / "nope.yaml")


def test_to_recipe_refuses_what_a_recipe_cannot_name():
    pruner = pk.Pruner(mlp(), 0.5, criterion=lambda w: w.abs())
    with pytest.raises(ValueError, match="not registered"):
        pruner.to_recipe()
    pruner = pk.Pruner(mlp(), 0.5, exclude=[nn.ReLU])
    assert "nn.ReLU" in pruner.to_recipe()
