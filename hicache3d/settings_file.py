"""Settings files: the per-site cache settings ``hicache3d tune`` picks, as TOML, applied by
``hicache3d patch --settings FILE`` and ``accelerate(pipe, settings=FILE)``.

A settings file::

    [tune]                       # where the settings came from (all keys optional but model)
    model = "bundled"            # the recipe they were measured on: applying them to another
                                 # model is refused
    target = "mesh IoU >= 0.98"
    steps = 12
    created = "2026-12-02T16:30:00Z"

    [sites.sparse_structure]     # one table per site; keys are cache settings (backend,
    backend = "hermite"          # schedule, interval, tolerance, first_enhance, ...) or the
    schedule = "adaptive"        # site's adapter options
    tolerance = 2.0

Loading checks everything before anything is applied: the file is TOML, names a model,
that model is the one asked for, every site exists in its recipe, every key is a setting
of that site, every value is valid (:class:`SettingsError` says which and where).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .config import CacheConfig
from .recipe import Recipe, RecipeError, get_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SettingsError", "SiteSettings", "load_settings", "dump_settings", "write_settings"]

_TUNE_KEYS = {"model", "target", "steps", "seed", "images", "created", "tool", "rank_by", "format",
              "combined", "note"}
_CONFIG_KEYS = {f.name for f in dataclasses.fields(CacheConfig)}


class SettingsError(RecipeError):
    """A settings file is missing, malformed, or does not fit the model."""


@dataclass(frozen=True)
class SiteSettings:
    """The per-site settings of one file, checked against ``recipe``."""

    path: Path
    model: str
    sites: Mapping[str, Mapping[str, Any]]
    tune: Mapping[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One phrase for ``status``: the file and what it was tuned for."""
        bits = [str(self.path)]
        info = [f"{k} {self.tune[k]}" for k in ("target", "steps", "created") if k in self.tune]
        if info:
            bits.append("(tuned: " + ", ".join(info) + ")")
        return " ".join(bits)


def load_settings(path: Union[str, Path], recipe: Union[str, Recipe, None] = None) -> SiteSettings:
    """Read and validate a settings file.  ``recipe`` (a name or a Recipe): the model the
    settings are applied to; a file made for another model is refused.  Without it, the
    file's own ``[tune] model`` is used."""
    p = Path(path).expanduser()
    where = f"settings file {p}"
    if p.is_dir():
        cand = p / "settings.toml"
        if cand.is_file():
            p, where = cand, f"settings file {cand}"
        else:
            raise SettingsError(f"{where} is a folder without settings.toml; give the file "
                                f"`hicache3d tune` wrote (OUT/settings.toml)")
    if not p.is_file():
        raise SettingsError(f"{where}: no such file (`hicache3d tune --out DIR` writes DIR/settings.toml)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{where} is not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"tune", "sites"})
    if unknown:
        raise SettingsError(f"{where}: unknown table or key {', '.join(map(repr, unknown))}; "
                            f"a settings file has [tune] and [sites.NAME] tables only")
    tune = data.get("tune", {})
    if not isinstance(tune, Mapping):
        raise SettingsError(f"{where}: [tune] must be a table")
    bad = sorted(set(tune) - _TUNE_KEYS)
    if bad:
        raise SettingsError(f"{where}: unknown key(s) {', '.join(map(repr, bad))} in [tune]; "
                            f"known: {', '.join(sorted(_TUNE_KEYS))}")
    model = tune.get("model")
    if not isinstance(model, str) or not model:
        raise SettingsError(f"{where}: [tune] needs model = \"NAME\" (the recipe the settings were "
                            f"measured on)")
    if recipe is None:
        recipe = model
    if isinstance(recipe, str):
        try:
            recipe = get_recipe(recipe)
        except RecipeError as e:
            raise SettingsError(f"{where}: {e}") from None
    if model != recipe.name:
        raise SettingsError(f"{where} holds settings tuned for model {model!r}, not for "
                            f"{recipe.name!r}; tune {recipe.name} itself (hicache3d tune --model "
                            f"{recipe.name} ...) or give the right file")
    sites = data.get("sites", {})
    if not isinstance(sites, Mapping) or not sites:
        raise SettingsError(f"{where}: no [sites.NAME] table; the file sets nothing")
    names = [s.name for s in recipe.sites]
    out: Dict[str, Dict[str, Any]] = {}
    for site, table in sites.items():
        if site not in names:
            raise SettingsError(f"{where}: unknown site {site!r} for model {recipe.name!r}; its "
                                f"sites: {', '.join(names)}")
        if not isinstance(table, Mapping):
            raise SettingsError(f"{where}: sites.{site} must be a table of settings")
        allowed = _CONFIG_KEYS | set(recipe.site(site).options) | {"options"}
        bad = sorted(set(table) - allowed)
        if bad:
            raise SettingsError(f"{where}: unknown setting(s) {', '.join(map(repr, bad))} in "
                                f"[sites.{site}]; settings: {', '.join(sorted(_CONFIG_KEYS))}")
        values = dict(table)
        if isinstance(values.get("candidates"), list):
            values["candidates"] = tuple(values["candidates"])
        if isinstance(values.get("candidate_damping"), list):
            values["candidate_damping"] = tuple(values["candidate_damping"])
        out[site] = values
    try:
        recipe.with_settings({}, out)                       # every value checked
    except RecipeError as e:
        raise SettingsError(f"{where}: {e}") from None
    return SiteSettings(p.resolve(), model, out, dict(tune))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} to a settings file")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write a {type(v).__name__} to a settings file")


def dump_settings(model: str, sites: Mapping[str, Mapping[str, Any]],
                  tune: Optional[Mapping[str, Any]] = None,
                  comments: Optional[Mapping[str, str]] = None, header: str = "") -> str:
    """The TOML text of a settings file (``comments``: one line above a site's table)."""
    info = {"model": model, **{k: v for k, v in (tune or {}).items() if k != "model"}}
    info.setdefault("created", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    lines = [f"# {h}" for h in header.splitlines()] + ([""] if header else [])
    lines.append("[tune]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in info.items() if v is not None]
    for site, values in sites.items():
        lines.append("")
        if comments and comments.get(site):
            lines += [f"# {c}" for c in comments[site].splitlines()]
        lines.append(f"[sites.{site}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_settings(path: Union[str, Path], model: str, sites: Mapping[str, Mapping[str, Any]],
                   **kw: Any) -> Path:
    """Write a settings file atomically; it is read back and validated first."""
    from ._io import atomic_write
    path = Path(path)
    text = dump_settings(model, sites, **kw)
    tomllib.loads(text)
    atomic_write(path, text.encode("utf-8"))
    return path
