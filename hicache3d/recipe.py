"""Recipes: one TOML file per model, naming the adapter, the targets, the supported
upstream versions, the sampling sites with their default settings, and the weights.

A recipe file::

    name = "hunyuan3d-2mini"
    description = "Hunyuan3D-2 mini shape generator"
    adapter = "hunyuan3d"                     # code in hicache3d.patches
    package = "hy3dgen"                       # distribution checked for the version
    versions = ">=2.0.2,<2.1"
    module = "hy3dgen.shapegen.pipelines"     # patched when imported
    run = "Hunyuan3DDiTFlowMatchingPipeline.__call__"
    weights = "tencent/Hunyuan3D-2mini"

    [sites.shape]                             # one table per sampling site
    step = "..."                              # adapter-specific per-step target
    backend = "dmd"
    interval = 5

    [sites.shape.options]                     # optional: adapter-specific site settings
    adaptive_cfg = true                       # (read by the adapter, not by CacheConfig)

Recipes ship in ``hicache3d.recipes`` and are also discovered from the
``hicache3d.recipes`` entry-point group (each entry point names a TOML file path or a
module whose folder holds ``*.toml`` files).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .config import CacheConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Recipe", "RecipeError", "SiteSpec", "load_recipe", "known_recipes", "get_recipe",
           "version_status"]

_SITE_KEYS = {"step", "t_arg", "description", "options"}


class RecipeError(ValueError):
    """A recipe is missing, unknown or malformed."""


@dataclass(frozen=True)
class SiteSpec:
    name: str
    config: CacheConfig
    step: Optional[str] = None          # adapter-specific per-step target
    t_arg: Any = None                   # generic adapter: name or index of the time argument
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)   # adapter-specific settings


@dataclass(frozen=True)
class Recipe:
    name: str
    adapter: str
    module: str
    sites: Tuple[SiteSpec, ...]
    package: Optional[str] = None
    versions: str = ""
    run: Optional[str] = None
    weights: Optional[str] = None
    weights_subfolder: Optional[str] = None
    description: str = ""
    source: str = ""
    alt_modules: Tuple[str, ...] = ()    # the same code under other module names
    extra: Mapping[str, Any] = field(default_factory=dict)

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name == name:
                return s
        raise RecipeError(f"recipe {self.name!r} has no site {name!r}; "
                          f"sites: {', '.join(s.name for s in self.sites)}")

    def with_settings(self, common: Mapping[str, Any] = None,
                      per_site: Mapping[str, Mapping[str, Any]] = None) -> "Recipe":
        """A copy whose site configs are overridden (``common`` for all sites, then per site).

        A key that names one of a site's adapter ``options`` (or an ``options`` mapping)
        overrides those options instead of the cache settings."""
        common = dict(common or {})
        per_site = dict(per_site or {})
        unknown = sorted(set(per_site) - {s.name for s in self.sites})
        if unknown:
            raise RecipeError(f"recipe {self.name!r} has no site {', '.join(unknown)}; "
                              f"sites: {', '.join(s.name for s in self.sites)}")
        sites = []
        for s in self.sites:
            changes = {**common, **dict(per_site.get(s.name, {}))}
            options = dict(s.options)
            extra = changes.pop("options", None)
            if extra is not None:
                if not isinstance(extra, Mapping):
                    raise RecipeError(f"recipe {self.name!r}, site {s.name!r}: options must be a mapping")
                options.update(extra)
            for k in [k for k in changes if k in s.options]:
                options[k] = changes.pop(k)
            sites.append(dataclasses.replace(s, config=_config(s.config.as_dict(), changes, self.name, s.name),
                                             options=options))
        return dataclasses.replace(self, sites=tuple(sites))


def _config(base: Mapping[str, Any], changes: Mapping[str, Any], recipe: str, site: str) -> CacheConfig:
    try:
        return CacheConfig.from_mapping({**dict(base), **dict(changes)})
    except (TypeError, ValueError) as e:
        raise RecipeError(f"recipe {recipe!r}, site {site!r}: {e}") from None


def parse_recipe(data: Mapping[str, Any], source: str = "") -> Recipe:
    where = f" in {source}" if source else ""
    for key in ("name", "adapter", "module"):
        if not isinstance(data.get(key), str) or not data.get(key):
            raise RecipeError(f"recipe{where} needs a string {key!r}")
    sites_raw = data.get("sites")
    if not isinstance(sites_raw, Mapping) or not sites_raw:
        raise RecipeError(f"recipe {data['name']!r}{where} needs at least one [sites.NAME] table")
    sites = []
    for name, table in sites_raw.items():
        if not isinstance(table, Mapping):
            raise RecipeError(f"recipe {data['name']!r}{where}: sites.{name} must be a table")
        settings = {k: v for k, v in table.items() if k not in _SITE_KEYS}
        if isinstance(settings.get("candidates"), list):
            settings["candidates"] = tuple(settings["candidates"])
        if isinstance(settings.get("candidate_damping"), list):
            settings["candidate_damping"] = tuple(settings["candidate_damping"])
        options = table.get("options", {})
        if not isinstance(options, Mapping):
            raise RecipeError(f"recipe {data['name']!r}{where}: sites.{name}.options must be a table")
        sites.append(SiteSpec(name=name, config=_config({}, settings, data["name"], name),
                              step=table.get("step"), t_arg=table.get("t_arg"),
                              description=table.get("description", ""), options=dict(options)))
    known = {"name", "adapter", "module", "sites", "package", "versions", "run", "weights",
             "weights_subfolder", "description", "alt_modules"}
    alt = data.get("alt_modules", [])
    if not (isinstance(alt, list) and all(isinstance(m, str) for m in alt)):
        raise RecipeError(f"recipe {data['name']!r}{where}: alt_modules must be a list of module names")
    return Recipe(name=data["name"], adapter=data["adapter"], module=data["module"],
                  sites=tuple(sites), package=data.get("package"),
                  versions=data.get("versions", ""), run=data.get("run"),
                  weights=data.get("weights"), weights_subfolder=data.get("weights_subfolder"),
                  description=data.get("description", ""), source=source, alt_modules=tuple(alt),
                  extra={k: v for k, v in data.items() if k not in known})


def load_recipe(path: "str | Path") -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {path} is not valid TOML: {e}") from None
    return parse_recipe(data, str(path))


def _builtin_files() -> List[Tuple[str, str]]:
    out = []
    for entry in resources.files("hicache3d.recipes").iterdir():
        if entry.name.endswith(".toml"):
            out.append((entry.read_text(encoding="utf-8"), f"hicache3d.recipes/{entry.name}"))
    return out


def _entry_point_files() -> List[Tuple[str, str]]:
    out = []
    try:
        eps = metadata.entry_points(group="hicache3d.recipes")
    except TypeError:  # pragma: no cover - Python < 3.10 API
        eps = metadata.entry_points().get("hicache3d.recipes", [])
    for ep in eps:
        target = ep.value
        p = Path(target)
        if p.suffix == ".toml" and p.exists():
            out.append((p.read_text(encoding="utf-8"), str(p)))
            continue
        try:
            mod = __import__(target, fromlist=["_"])
            folder = Path(mod.__file__).parent
            for f in sorted(folder.glob("*.toml")):
                out.append((f.read_text(encoding="utf-8"), str(f)))
        except Exception as e:  # a broken plug-in must not break the others
            print(f"hicache3d: ignoring recipe entry point {ep.name!r}: {e}", file=sys.stderr)
    return out


def known_recipes() -> Dict[str, Recipe]:
    """All recipes: the shipped ones, then entry-point ones (which may not shadow them)."""
    out: Dict[str, Recipe] = {}
    for text, source in _builtin_files() + _entry_point_files():
        try:
            r = parse_recipe(tomllib.loads(text), source)
        except (RecipeError, tomllib.TOMLDecodeError) as e:
            print(f"hicache3d: ignoring recipe {source}: {e}", file=sys.stderr)
            continue
        out.setdefault(r.name, r)
    return out


def get_recipe(name_or_path: str) -> Recipe:
    """A recipe by name, or from a ``.toml`` path."""
    if name_or_path.endswith(".toml"):
        return load_recipe(name_or_path)
    recipes = known_recipes()
    if name_or_path not in recipes:
        raise RecipeError(f"unknown model {name_or_path!r}; known recipes: "
                          f"{', '.join(sorted(recipes)) or '(none)'} "
                          f"(or pass --recipe FILE.toml)")
    return recipes[name_or_path]


def _parse_version(v: str) -> Tuple[int, ...]:
    parts = []
    for p in v.split("."):
        num = "".join(ch for ch in p if ch.isdigit())
        if not num:
            break
        parts.append(int(num))
        if num != p:
            break
    return tuple(parts)


def version_in_range(version: str, spec: str) -> bool:
    """Minimal specifier check: comma-separated ``>=, >, <=, <, ==, !=`` clauses."""
    v = _parse_version(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        for op in (">=", "<=", "==", "!=", ">", "<"):
            if clause.startswith(op):
                ref = _parse_version(clause[len(op):].strip())
                n = max(len(v), len(ref))
                a, b = v + (0,) * (n - len(v)), ref + (0,) * (n - len(ref))
                ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b,
                      ">": a > b, "<": a < b}[op]
                if not ok:
                    return False
                break
        else:
            raise RecipeError(f"cannot read version clause {clause!r}")
    return True


def installed_module(recipe: Recipe) -> Optional[str]:
    """The first of the recipe's module names whose top-level package is importable."""
    from importlib.util import find_spec
    for mod in (recipe.module,) + tuple(recipe.alt_modules):
        try:
            if find_spec(mod.split(".")[0]) is not None:
                return mod
        except (ImportError, ValueError):
            continue
    return None


def for_module(recipe: Recipe, module: str) -> Recipe:
    """The recipe targeting ``module`` (one of its module names)."""
    if module == recipe.module:
        return recipe
    if module not in recipe.alt_modules:
        raise RecipeError(f"recipe {recipe.name!r} does not target module {module!r}")
    return dataclasses.replace(recipe, module=module)


def version_status(recipe: Recipe) -> Tuple[Optional[str], bool]:
    """``(installed version or None, inside the supported range)``."""
    if not recipe.package:
        return None, True
    try:
        v = metadata.version(recipe.package)
    except metadata.PackageNotFoundError:
        return None, False
    return v, (not recipe.versions) or version_in_range(v, recipe.versions)
