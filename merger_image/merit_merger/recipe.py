"""mergekit both ways: the recipe that reproduces a MeritRun merge, and a recipe run here.

Export (`mergekit.yaml` beside the report): token-weighted and uniform are `linear` (explicit
weights; normalize false / true), task arithmetic is `task_arithmetic` (weight 1, lambda =
scale), TIES is `ties` (weight 1, the density, sum sign consensus, normalize true = the
disjoint mean, lambda), DARE is `dare_linear` (weight 1, density, lambda). Models are named by
absolute local paths, which is what mergekit loads: a `file://` location becomes its path; an
`s3://` one becomes the key, relative to a directory the header says how to fill. LoRA
partitions are `BASE+ADAPTER`, mergekit's syntax for applying an adapter. OTA (and its FFG
masks) has no mergekit equivalent: its file holds the nearest recipe (the token-weighted
`linear` merge of the same partitions) under a header that says it does NOT reproduce OTA.

Import (`meritrun merge --recipe mergekit.yaml`): a recipe of the methods we have becomes our
method and parameters (`recipe_plan`); anything else is refused with what we do support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from meritrun.errors import SpecError

from .methods import MergeMethod, get_method

RECIPE_NAME = "mergekit.yaml"
NO_EQUIVALENT = ("mergekit has no equivalent of {method}: curvature-weighted (Adam second "
                 "moment) averaging with Fast Fisher Grafting masks is not one of its methods")
NEAREST = "linear"  # what an OTA recipe falls back to (token-weighted; not a reproduction)


def local_path(uri: str) -> tuple[str, str | None]:
    """(the path mergekit should load, the s3 prefix to download there first, if any)."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path), None
    if uri.startswith("s3://"):
        key = uri.removeprefix("s3://").split("/", 1)
        return (key[1] if len(key) > 1 else key[0]), uri
    return (str(Path(uri).resolve()) if "://" not in uri else uri), None


def mergekit_recipe(
    *, method: MergeMethod, params: Mapping[str, Any], base: str,
    partitions: Sequence[tuple[str, str, str]], weights: Mapping[str, float], dtype: str,
) -> dict[str, Any] | None:
    """The recipe as a dict (OTA: the nearest token-weighted `linear` one), or None when
    mergekit has nothing close.

    partitions: (name, model path or URI, "full" | "lora"); weights: token weights by name.
    """
    exact = method.mergekit is not None
    if not exact and not method.needs_moments:
        return None
    base_path = local_path(base)[0]

    def model(uri: str, kind: str) -> str:
        path = local_path(uri)[0]
        return f"{base_path}+{path}" if kind == "lora" else path

    shared: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    if method.key == "token-weighted" or not exact:
        per = {n: {"weight": float(weights[n])} for n, _, _ in partitions}
        shared = {"normalize": False}
    elif method.key == "uniform":
        per = {n: {"weight": 1.0} for n, _, _ in partitions}
        shared = {"normalize": True}
    else:
        per = {n: {"weight": 1.0} for n, _, _ in partitions}
        if "density" in params:
            for entry in per.values():
                entry["density"] = float(params["density"])
        shared = {"normalize": method.key == "ties", "lambda": float(params.get("scale", 1.0))}
        if method.key == "dare":
            shared["rescale"] = True
    recipe: dict[str, Any] = {
        "merge_method": method.mergekit or NEAREST,
        "models": [{"model": model(uri, kind), "parameters": per[name]}
                   for name, uri, kind in partitions],
        "parameters": shared,
        "dtype": dtype,
    }
    if (exact and method.needs_base) or any(kind == "lora" for _, _, kind in partitions):
        recipe["base_model"] = base_path
    return recipe


def write_recipe(path: Path, recipe: Mapping[str, Any], *, method: MergeMethod,
                 locations: Sequence[str] = ()) -> Path:
    """The recipe with a header: how to run it, what to download first, what differs."""
    header = [f"# mergekit recipe for the MeritRun '{method.key}' merge.",
              "# Run: mergekit-yaml mergekit.yaml OUT_DIR"]
    if method.mergekit is None:
        header += [f"# NOT A REPRODUCTION: {NO_EQUIVALENT.format(method=method.key.upper())}.",
                   "# Below is the nearest mergekit recipe, the token-weighted linear merge of "
                   "the same partitions",
                   "# (MERIT's merge without the curvature weighting)."]
    remote = sorted({s3 for uri in locations if (s3 := local_path(uri)[1])})
    if remote:
        header.append("# The models are in S3: download them first, then run from that "
                      "directory:")
        header += [f"#   aws s3 cp --recursive {uri} {local_path(uri)[0]}" for uri in remote]
    if method.key == "dare":
        header.append("# DARE: mergekit draws its own random masks and rescales by the L1 norm,"
                      " so the result matches in distribution, not bit for bit.")
    text = "\n".join(header) + "\n" + yaml.safe_dump(dict(recipe), sort_keys=False)
    Path(path).write_text(text)
    return Path(path)


# --- import: a mergekit recipe run by `meritrun merge --recipe` ------------------------------

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] | None = None


class _Recipe(BaseModel):
    """The part of mergekit's MergeConfiguration we can run: `models`, not slices/modules."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    models: list[_Model]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None


@dataclass(frozen=True)
class RecipePlan:
    """A mergekit recipe as a MeritRun merge: method, parameters, inputs, weights."""

    method: str
    params: dict[str, Any]
    base: str | None
    models: list[str]  # paths or URIs; for LoRA the adapter (the base is `base`)
    weights: list[float] | None  # linear: explicit weights, become the token weights
    dtype: str | None


_SUPPORTED = "linear, task_arithmetic, ties, dare_linear"


def _scalar(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{what}: {value!r} is not a number (gradients and per-tensor filters "
                        "are mergekit-only)", path="recipe")
    return float(value)


def _same(values: list[float], what: str) -> float:
    if any(not math.isclose(v, values[0], rel_tol=1e-9) for v in values):
        raise SpecError(f"{what} differs between models ({values}); MeritRun's methods take one "
                        "value for all (only linear takes per-model weights)", path="recipe")
    return values[0]


def recipe_plan(path: Path) -> RecipePlan:
    """Read a mergekit recipe and translate it; SpecError names what cannot be translated."""
    try:
        doc = _Recipe.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot read the recipe: {e}", path="recipe") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SpecError(f"{path}: {where}: {first['msg']} (slices and modules are "
                        "mergekit-only; give `models`)", path="recipe") from e
    shared = doc.parameters or {}
    per = [m.parameters or {} for m in doc.models]
    weights = [_scalar(p.get("weight", 1.0), "weight") for p in per]
    lam = _scalar(shared.get("lambda", 1.0), "lambda")
    models, base = [], doc.base_model
    for m in doc.models:
        model, plus, adapter = m.model.partition("+")
        if plus and base and model != base:
            raise SpecError(f"{m.model}: a LoRA adapter must apply to base_model {base}",
                            path="recipe")
        base = base or (model if plus else None)
        models.append(adapter if plus else model)
    method, params, explicit = doc.merge_method, {}, None
    if method == "linear":
        if not shared.get("normalize", True) and not math.isclose(sum(weights), 1.0):
            raise SpecError("linear with normalize: false and weights not summing to 1 is not "
                            "an average; MeritRun merges averages", path="recipe")
        equal = all(math.isclose(w, weights[0]) for w in weights)
        key, explicit = ("uniform", None) if equal else ("token-weighted", weights)
    elif method in ("task_arithmetic", "dare_linear"):
        w = _same(weights, "weight")
        scale = lam / len(weights) if shared.get("normalize", False) else lam * w
        key, params = ("task-arithmetic" if method == "task_arithmetic" else "dare"), {
            "scale": scale}
        if method == "dare_linear":
            params["density"] = _same([_scalar(p.get("density", 1.0), "density") for p in per],
                                      "density")
            if not shared.get("rescale", True):
                raise SpecError("dare_linear with rescale: false is not DARE", path="recipe")
    elif method == "ties":
        _same(weights, "weight")
        if not shared.get("normalize", True):
            raise SpecError("ties with normalize: false is not TIES's disjoint mean",
                            path="recipe")
        key, params = "ties", {"scale": lam, "density": _same(
            [_scalar(p.get("density", 1.0), "density") for p in per], "density")}
    else:
        raise SpecError(f"merge_method {method!r} is not one MeritRun runs; it runs {_SUPPORTED}"
                        " (and OTA, which mergekit cannot express)", path="recipe")
    if get_method(key).needs_base and base is None:
        raise SpecError(f"merge_method {method} needs base_model", path="recipe")
    return RecipePlan(key, params, base, models, explicit, doc.out_dtype or doc.dtype)
