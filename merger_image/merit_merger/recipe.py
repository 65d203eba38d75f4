"""A mergekit recipe that reproduces a MeritRun merge, for people who already use mergekit.

Written beside the report as `mergekit.yaml` when mergekit has the method: token-weighted and
uniform are `linear` (explicit weights; normalize false / true), task arithmetic is
`task_arithmetic` (weight 1, lambda = scale), TIES is `ties` (weight 1, the density, sum sign
consensus, normalize true = the disjoint mean, lambda), DARE is `dare_linear` (weight 1,
density, lambda). Caveats recorded in the recipe's header: DARE's random draw differs, and
mergekit rescales kept DARE entries to preserve the L1 norm rather than by 1/density. OTA and
FFG have no mergekit equivalent: no recipe is written and the report says so. LoRA partitions
are named `BASE+ADAPTER`, mergekit's syntax for applying an adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .methods import MergeMethod

RECIPE_NAME = "mergekit.yaml"
NO_EQUIVALENT = ("mergekit has no equivalent of {method}: curvature-weighted (Adam second "
                 "moment) averaging with Fast Fisher Grafting masks is not one of its methods")


def mergekit_recipe(
    *, method: MergeMethod, params: Mapping[str, Any], base: str,
    partitions: Sequence[tuple[str, str, str]], weights: Mapping[str, float], dtype: str,
) -> dict[str, Any] | None:
    """The recipe as a dict, or None when mergekit has no such method.

    partitions: (name, model path or URI, "full" | "lora"); weights: token weights by name.
    """
    if method.mergekit is None:
        return None

    def model(path: str, kind: str) -> str:
        return f"{base}+{path}" if kind == "lora" else path

    shared: dict[str, Any] = {}
    per: dict[str, dict[str, Any]] = {}
    if method.key == "token-weighted":
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
        "merge_method": method.mergekit,
        "models": [{"model": model(path, kind), "parameters": per[name]}
                   for name, path, kind in partitions],
        "parameters": shared,
        "dtype": dtype,
    }
    if method.needs_base or any(kind == "lora" for _, _, kind in partitions):
        recipe["base_model"] = base
    return recipe


def write_recipe(path: Path, recipe: Mapping[str, Any], *, method: MergeMethod) -> Path:
    header = [f"# mergekit recipe reproducing the MeritRun '{method.key}' merge.",
              "# Run: mergekit-yaml mergekit.yaml OUT_DIR (paths must be local directories)."]
    if method.key == "dare":
        header.append("# DARE: mergekit draws its own random masks and rescales by the L1 norm,"
                      " so the result matches in distribution, not bit for bit.")
    text = "\n".join(header) + "\n" + yaml.safe_dump(dict(recipe), sort_keys=False)
    Path(path).write_text(text)
    return Path(path)
