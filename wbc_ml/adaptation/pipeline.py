"""Adapting a trained classifier to a lab's labelled cells: candidates, cross-validated choice, final model.

Candidates (each scored by stratified cross-validation on the lab's adaptation cells only):

* ``bn``: BatchNormalization statistics re-estimated on the lab's images (label-free); the head is unchanged.
* ``head``: a new class-balanced logistic-regression head on the pooled features of several views per cell (the
  flips and quarter turns of a square image; with or without re-estimated BatchNormalization; regularisation C from
  a grid), served on the image alone or as the average over its four quarter turns (``quarter_turns``).
  The cross-validation decides for each lab (see wbc_ml.turns for what it did on BCCD).
* ``finetune``: re-estimated BatchNormalization, then the last block and the head trained on cached trunk
  activations (the head starts from the best logistic-regression head).

The temperature is refitted on the chosen candidate's out-of-fold probabilities and the non-WBC detectors on the
lab's features, with thresholds from out-of-fold scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from ..metrics import apply_temperature, fit_temperature
from ..ood import OodDetector
from ..preprocessing import Normalization
from ..training.augmentation import augment_batch, jitter_colours
from ..training.config import Log
from ..turns import SYMMETRIES, symmetries, turn_views
from .cv import MAX_FOLDS, folds, oof_summary, paired_se
from .detectors import fit_lab_detectors
from .finetune import cross_validate as cross_validate_finetune
from .finetune import finetune as finetune_tail
from .heads import LinearHead
from .heads import cross_validate as cross_validate_head
from .network import Parts, cut, dense_head, load_parts, predict
from .progress import (
    BATCHNORM_UNITS,
    BN_CANDIDATE_UNITS,
    DETECTOR_UNITS,
    EPOCH_UNITS,
    HEAD_FIT_UNITS,
    SAVE_UNITS,
    Progress,
)

METHODS = ("bn", "head", "finetune")


@dataclass
class AdaptConfig:
    methods: tuple[str, ...] = METHODS  # the candidates; the best by cross-validation is chosen
    views: int = SYMMETRIES  # views per cell: its flips and quarter turns (random augmentations if not square)
    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0)
    quarter_turns: tuple[int, ...] = (1, 4)  # a head served on the image alone, or averaged over its 4 turns
    # A head on the average- and max-pooled features ('avg+max') or on re-estimated BatchNormalization (True) never
    # beat the plain head in cross-validation on BCCD or PBC cells: not tried by default, to stay within 5 minutes.
    poolings: tuple[str, ...] = ("avg",)  # ("avg", "avg+max")
    head_batchnorm: tuple[bool, ...] = (False,)  # (False, True): BatchNormalization as trained / re-estimated
    learning_rates: tuple[float, ...] = (1e-4,)
    epochs: int = 6
    folds: int = MAX_FOLDS
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown adaptation method(s) {unknown}; choose from {METHODS}")


@dataclass
class Candidate:
    method: str
    params: dict
    oof_probs: np.ndarray
    cv: dict


@dataclass
class Adapted:
    """A finished adaptation: the served network, its temperature and detectors, and what was measured."""

    candidate: Candidate
    model: keras.Model
    temperature: float
    detector: OodDetector
    detector_summary: dict
    folds: int
    candidates: dict[str, Candidate] = field(default_factory=dict)


class Backbone:
    """One copy of the base model (BatchNormalization re-estimated or not) with cached activations and features."""

    def __init__(self, parts: Parts, acts: np.ndarray, non_wbc_acts: np.ndarray | None):
        self.parts, self.acts, self.non_wbc_acts = parts, acts, non_wbc_acts
        self.features = self.features_of(parts, acts)

    def subset(self, rows: np.ndarray) -> Backbone:
        """The same backbone for some of its cells (cached activations and features sliced, not recomputed)."""
        subset = Backbone.__new__(Backbone)
        subset.parts, subset.acts, subset.non_wbc_acts = self.parts, self.acts[rows], self.non_wbc_acts
        subset.features = self.features[rows]
        return subset

    @staticmethod
    def features_of(parts: Parts, acts: np.ndarray) -> np.ndarray:
        top = parts.top_features()
        flat = acts.reshape(-1, *acts.shape[2:])
        return np.asarray(predict(top, flat, None, 64), np.float64).reshape(*acts.shape[:2], -1)

    def head_features(self, pooling: str) -> np.ndarray:
        """The average-pooled half of the features ('avg'), or all of them ('avg+max')."""
        return self.features if pooling == "avg+max" else self.features[..., : self.features.shape[-1] // 2]


class Adaptation:
    """Everything computed once for one lab's cells: views, activations, features, folds."""

    def __init__(
        self,
        base_path: Path,
        card: dict,
        x: np.ndarray,
        labels: np.ndarray,
        non_wbc: np.ndarray | None,
        config: AdaptConfig,
        log: Log = print,
        backbones: dict[bool, Backbone] | None = None,
        progress: Progress | None = None,
    ):
        keras.utils.set_random_seed(config.seed)
        self.base_path, self.card, self.config, self.log = base_path, card, config, log
        self.progress = progress or Progress()
        self.normalization = Normalization.from_dict(card["normalization"])
        self.n_classes = len(card["class_names"])
        self.x, self.labels, self.non_wbc = x, labels, non_wbc
        self.splits = folds(labels, config.seed, config.folds)
        self._backbones: dict[bool, Backbone] = dict(backbones or {})  # precomputed (a benchmark's cache)
        self.progress.plan(self.planned_units())

    def _head_batchnorms(self) -> set[bool]:
        """The copies of the base model that heads are cross-validated on (BatchNormalization as trained or
        re-estimated); fine-tuning starts from the best head on re-estimated BatchNormalization."""
        methods = self.config.methods
        batchnorms = set(self.config.head_batchnorm) if "head" in methods else set()
        if "finetune" in methods:
            batchnorms.add(True)
        return batchnorms

    def planned_units(self) -> float:
        """The work ahead in :mod:`.progress` units: features, candidates, the final model, detectors, saving."""
        config, methods = self.config, self.config.methods
        heads = self._head_batchnorms()
        copies = heads | ({True} if "bn" in methods else set())
        units = len(copies) * config.views + BATCHNORM_UNITS * (True in copies)
        units += BN_CANDIDATE_UNITS * ("bn" in methods)
        units += HEAD_FIT_UNITS * len(self.splits) * len(config.poolings) * len(config.c_grid) * len(heads)
        if "finetune" in methods:  # the cross-validation, then (when chosen) the final model
            units += EPOCH_UNITS * config.epochs * (len(self.splits) * len(config.learning_rates) + 1)
        return units + DETECTOR_UNITS + SAVE_UNITS

    @property
    def square(self) -> bool:
        return self.x.shape[1] == self.x.shape[2]

    def _views(self):
        """The views of every cell, view 0 the image as it is. A square image: its quarter turns (what serving may
        average) and their mirror images with mild colour jitter, in :func:`symmetries` order; else random
        augmentations."""
        rng = np.random.default_rng(self.config.seed)
        if not self.square:
            yield self.x
            for _ in range(self.config.views - 1):
                yield augment_batch(self.x, rng)
            return
        for v, view in enumerate(symmetries(self.x)[: self.config.views]):
            yield view if v % 2 == 0 else np.stack([jitter_colours(image, rng) for image in view])

    def _turn_options(self) -> list[int]:
        """The quarter-turn averages a head may be served with: those whose turns are among the cached views."""
        usable = self.config.views if self.square else 1
        return [t for t in self.config.quarter_turns if max(turn_views(t)) < usable] or [1]

    def backbone(self, batchnorm: bool) -> Backbone:
        if batchnorm not in self._backbones:
            started = time.time()
            self.progress.at("BatchNormalization re-estimated" if batchnorm else "features")
            parts = load_parts(self.base_path, self.x if batchnorm else None, self.normalization)
            if batchnorm:
                self.progress.advance("BatchNormalization re-estimated", BATCHNORM_UNITS)
            views = []
            for v, x in enumerate(self._views()):
                views.append(predict(parts.trunk, x, self.normalization))
                self.progress.advance(f"features of view {v + 1} of {self.config.views}")
            acts = np.stack(views, axis=1)
            non_wbc = predict(parts.trunk, self.non_wbc, self.normalization) if self.non_wbc is not None else None
            self._backbones[batchnorm] = Backbone(parts, acts, non_wbc)
            self.log(
                f"features of {len(self.x)} cells x {self.config.views} views "
                f"(BatchNormalization {'re-estimated' if batchnorm else 'as trained'}) in {time.time() - started:.0f}s"
            )
        return self._backbones[batchnorm]

    def _candidate(self, method: str, params: dict, oof: np.ndarray) -> Candidate:
        summary = oof_summary(self.labels, oof, self.config.seed)
        self.log(f"  {method} {params}: CV accuracy {summary['accuracy']:.3f}, macro-F1 {summary['macro_f1']:.3f}")
        return Candidate(method, params, oof, summary)

    def candidates(self) -> dict[str, Candidate]:
        """The best candidate of each requested method, by out-of-fold macro-F1 (then accuracy)."""
        best: dict[str, Candidate] = {}
        methods = self.config.methods
        if "bn" in methods:
            probs = predict(self.backbone(True).parts.full, self.x, self.normalization)
            best["bn"] = self._candidate("bn", {"batchnorm": True}, np.asarray(probs, np.float64))
            self.progress.advance("cross-validating: BatchNormalization re-estimated", BN_CANDIDATE_UNITS)
        head_scores: dict[bool, Candidate] = {}
        batchnorms = self._head_batchnorms()
        if batchnorms:
            for batchnorm in sorted(batchnorms):
                backbone = self.backbone(batchnorm)
                tried = []
                for pooling in self.config.poolings:
                    for c in self.config.c_grid:
                        params = {"batchnorm": batchnorm, "pooling": pooling, "C": c, "views": self.config.views}
                        oofs = cross_validate_head(
                            backbone.head_features(pooling), self.labels, self.splits, c, self.n_classes,
                            {turns: turn_views(turns) for turns in self._turn_options()},
                        )  # fmt: skip
                        for turns, oof in oofs.items():
                            tried.append(self._candidate("head", params | {"quarter_turns": turns}, oof))
                        self.progress.advance("cross-validating: new head", HEAD_FIT_UNITS * len(self.splits))
                head_scores[batchnorm] = _best(tried)
            if "head" in methods:
                best["head"] = _best([head_scores[b] for b in self.config.head_batchnorm])
        if "finetune" in methods:
            backbone = self.backbone(True)
            head = head_scores[True].params
            tried = []
            for lr in self.config.learning_rates:
                params = head | {"learning_rate": lr, "epochs": self.config.epochs, "quarter_turns": 1}
                oof = cross_validate_finetune(
                    backbone.parts,
                    backbone.acts,
                    backbone.head_features(head["pooling"]),
                    self.labels,
                    self.splits,
                    params,
                    self.config.seed,
                    self.n_classes,
                    on_epoch=self._epoch_done("cross-validating: fine-tuning"),
                )
                tried.append(self._candidate("finetune", params, oof))
            best["finetune"] = _best(tried)
        return best

    def _epoch_done(self, stage: str):
        return lambda: self.progress.advance(stage, EPOCH_UNITS)

    def finalize(self, candidate: Candidate) -> Adapted:
        """The served network for ``candidate`` fitted on all the cells, its temperature and detectors."""
        self.progress.at(f"fitting the chosen method ({candidate.method}) on every cell")
        backbone = self.backbone(candidate.params["batchnorm"])
        parts = backbone.parts
        if candidate.method == "bn":
            model = parts.full
            features, non_wbc = backbone.features, backbone.non_wbc_acts
            non_wbc_features = self._non_wbc_features(parts, non_wbc)
        else:
            p = candidate.params
            start = LinearHead(p["C"], self.n_classes).fit(backbone.head_features(p["pooling"]), self.labels)
            if candidate.method == "head":
                model = parts.with_head(dense_head(*start.weights()), p["pooling"])
                features = backbone.features
                non_wbc_features = self._non_wbc_features(parts, backbone.non_wbc_acts)
            else:
                parts = _copy(parts)  # the other candidates keep sharing the un-tuned layers
                head = finetune_tail(
                    parts, backbone.acts, self.labels, start, p["learning_rate"], p["epochs"], self.config.seed,
                    p["pooling"], on_epoch=self._epoch_done("fine-tuning on every cell"),
                )  # fmt: skip
                model = parts.with_head(head, p["pooling"])
                features = Backbone.features_of(parts, backbone.acts)
                non_wbc_features = self._non_wbc_features(parts, backbone.non_wbc_acts)
        temperature = fit_temperature(candidate.oof_probs, self.labels)
        confidence = apply_temperature(candidate.oof_probs, temperature).max(axis=1)
        self.progress.at("refitting the detectors")
        detector, summary = fit_lab_detectors(features, self.labels, self.splits, confidence, non_wbc_features)
        self.progress.advance("refitting the detectors", DETECTOR_UNITS)
        return Adapted(candidate, model, temperature, detector, summary, len(self.splits))

    @staticmethod
    def _non_wbc_features(parts: Parts, acts: np.ndarray | None) -> np.ndarray | None:
        if acts is None:
            return None
        return np.asarray(predict(parts.top_features(), acts, None, 64), np.float64)


def _best(tried: list[Candidate]) -> Candidate:
    return max(tried, key=lambda c: (round(c.cv["macro_f1"], 6), round(c.cv["accuracy"], 6)))


def _copy(parts: Parts) -> Parts:
    clone = keras.models.clone_model(parts.full)
    clone.set_weights(parts.full.get_weights())
    for layer in clone.layers:
        layer.trainable = False
    return cut(clone)


CHOICE_RULE = (
    "the highest out-of-fold macro-F1 (then accuracy), except that fine-tuning must beat the new head it starts from "
    "by more than one standard error of their paired difference (bootstrap over the cells), else the head is kept"
)


def choose(candidates: dict[str, Candidate], labels: np.ndarray, seed: int = 0) -> Candidate:
    """The candidate to serve, by :data:`CHOICE_RULE`.

    Fine-tuning starts from the new head and trains the last block too: on a few dozen cells it often wins the
    cross-validation by chance. Between these two nested models the one-standard-error rule (Breiman et al. 1984;
    Hastie, Tibshirani and Friedman, ESL 7.10) keeps the simpler one unless the difference is larger than the
    cross-validation's own noise. It is not applied to 'bn', which learns nothing from the labels: on 41 cells its
    macro-F1 came within one standard error of the head's with a third of the head's accuracy on unseen cells.
    """
    best = _best([candidates[m] for m in METHODS if m in candidates])
    head = candidates.get("head")
    if best.method == "finetune" and head is not None:
        gap = best.cv["macro_f1"] - head.cv["macro_f1"]
        if gap <= paired_se(labels, best.oof_probs, head.oof_probs, seed):
            return head
    return best


def non_wbc_sample(data_dir: Path, per_kind: int) -> list[Path]:
    """Up to ``per_kind`` images of each kind from the fitting part of ``pbc-non-wbc/`` beside ``data_dir``."""
    from ..training.detectors import non_wbc_parts

    fit = non_wbc_parts(data_dir).fit
    kinds: dict[Path, list[Path]] = {}
    for path in fit:
        kinds.setdefault(path.parent, []).append(path)
    return [p for members in kinds.values() for p in members[:per_kind]]
