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
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .config import CacheConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Recipe", "RecipeError", "SiteSpec", "Install", "load_recipe", "known_recipes", "get_recipe",
           "find_install", "version_status", "version_in_range"]

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
    steps_arg: Any = None                # generic adapter: name or position of the run's step count
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
             "weights_subfolder", "description", "alt_modules", "steps_arg"}
    steps_arg = data.get("steps_arg")
    if steps_arg is not None and not (isinstance(steps_arg, str) and steps_arg.isidentifier()
                                      or isinstance(steps_arg, int) and not isinstance(steps_arg, bool)
                                      and steps_arg >= 0):
        raise RecipeError(f"recipe {data['name']!r}{where}: steps_arg must name the run entry's "
                          f"step-count argument (a name, or a position >= 0 not counting self), "
                          f"got {steps_arg!r}")
    versions = data.get("versions", "")
    if not isinstance(versions, str):
        raise RecipeError(f"recipe {data['name']!r}{where}: versions must be a string such as '>=0.1,<0.2'")
    _specifiers(versions, f" of recipe {data['name']!r}{where}")
    alt = data.get("alt_modules", [])
    if not (isinstance(alt, list) and all(isinstance(m, str) for m in alt)):
        raise RecipeError(f"recipe {data['name']!r}{where}: alt_modules must be a list of module names")
    return Recipe(name=data["name"], adapter=data["adapter"], module=data["module"],
                  sites=tuple(sites), package=data.get("package"),
                  versions=data.get("versions", ""), run=data.get("run"),
                  weights=data.get("weights"), weights_subfolder=data.get("weights_subfolder"),
                  description=data.get("description", ""), source=source, alt_modules=tuple(alt),
                  steps_arg=steps_arg, extra={k: v for k, v in data.items() if k not in known})


def load_recipe(path: "str | Path") -> Recipe:
    path = Path(path)
    if path.suffix != ".toml":
        what = "does not exist" if not path.exists() else f"is not a .toml file ({path.suffix or 'no suffix'})"
        raise RecipeError(f"recipe file {path} {what}: a recipe is a TOML file named NAME.toml")
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
    builtin = _builtin_files()
    for i, (text, source) in enumerate(builtin + _entry_point_files()):
        try:
            r = parse_recipe(tomllib.loads(text), source)
        except (RecipeError, tomllib.TOMLDecodeError) as e:
            print(f"hicache3d: ignoring recipe {source}: {e}", file=sys.stderr)
            continue
        if r.name in out:
            print(f"hicache3d: ignoring recipe {source}: its name {r.name!r} is taken by "
                  f"{out[r.name].source}", file=sys.stderr)
            continue
        out[r.name] = r
    return out


def builtin_names() -> List[str]:
    """Names of the recipes shipped with hicache3d."""
    names = []
    for text, source in _builtin_files():
        try:
            names.append(str(tomllib.loads(text).get("name")))
        except tomllib.TOMLDecodeError:
            continue
    return names


def _looks_like_path(ref: str) -> bool:
    return ref.endswith(".toml") or "/" in ref or os.sep in ref or Path(ref).is_file()


def get_recipe(name_or_path: "str | os.PathLike | Recipe") -> Recipe:
    """A recipe by name, or from a ``.toml`` path (a :class:`Recipe` is returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"recipe must be a recipe name (see `hicache3d recipes`), the path of a "
                        f".toml recipe or a Recipe, got {type(name_or_path).__name__} {name_or_path!r}")
    ref = os.fspath(name_or_path)
    if _looks_like_path(ref):
        return load_recipe(ref)
    recipes = known_recipes()
    if ref not in recipes:
        raise RecipeError(f"unknown model {ref!r}; known recipes: "
                          f"{', '.join(sorted(recipes)) or '(none)'} "
                          f"(or pass --recipe FILE.toml)")
    return recipes[ref]


def _specifiers(spec: str, where: str = "") -> SpecifierSet:
    try:
        return SpecifierSet(spec)
    except InvalidSpecifier:
        raise RecipeError(f"cannot read the version range {spec!r}{where} "
                          f"(expected e.g. '>=0.1.2,<0.2' or '~=2.0')") from None


def version_in_range(version: str, spec: str) -> bool:
    """Whether ``version`` is inside the version range ``spec`` (PEP 440 specifiers, as pip
    reads them: ``>=, <, ~=, ==, !=`` ... with pre-, post- and dev-releases).  An installed
    pre-release is accepted when the range holds it."""
    try:
        v = Version(version)
    except InvalidVersion:
        return False
    return _specifiers(spec).contains(v, prereleases=True)


def _norm(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


@dataclass(frozen=True)
class Install:
    """Where a recipe's generator code is, as seen from this process (see :func:`find_install`)."""

    module: Optional[str] = None       # the first of the recipe's module names found
    folder: Optional[Path] = None      # the import-path folder it is found in
    where: str = ""                    # "interpreter path", "current directory" or "PYTHONPATH"
    version: Optional[str] = None      # version of the recipe's distribution, where metadata exists
    owner: Optional[str] = None        # another distribution that ships the module

    @property
    def found(self) -> bool:
        return self.module is not None

    @property
    def source_checkout(self) -> bool:
        """Found, with no distribution metadata: a source checkout (or a copy) of the code."""
        return (self.found and self.version is None and self.owner is None
                and self.module.split(".")[0] != "hicache3d")

    @property
    def package_dir(self) -> Optional[Path]:
        """The top-level package folder (or module file) of the code found."""
        if self.folder is None:
            return None
        top = self.folder / self.module.split(".")[0]
        return top if top.is_dir() or not top.with_suffix(".py").is_file() else top.with_suffix(".py")


def _spec_folder(spec: Any) -> Optional[Path]:
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    if locs:
        return Path(locs[0]).resolve().parent
    if spec.origin and spec.has_location:
        return Path(spec.origin).resolve().parent
    return None


def _owner(top: str, folder: Path) -> Optional[Tuple[str, str]]:
    """The distribution installed in ``folder`` that ships the top-level module ``top``."""
    try:
        dists = list(metadata.distributions(path=[str(folder)]))
    except Exception:
        return None
    for d in dists:
        try:
            tops = (d.read_text("top_level.txt") or "").split()
            if not tops:
                tops = {Path(str(f)).parts[0].removesuffix(".py") for f in (d.files or [])}
        except Exception:
            continue
        if top in tops:
            return d.metadata["Name"], d.version
    return None


def search_path(cwd: "str | Path | None" = None) -> List[Tuple[Path, str]]:
    """The folders a user's process may import from beyond this interpreter's path: the
    current directory (a user standing in a checkout) and ``PYTHONPATH``."""
    out = [(Path(cwd or os.getcwd()).resolve(), "current directory")]
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p:
            out.append((Path(p).resolve(), "PYTHONPATH"))
    return out


def find_install(recipe: Recipe, cwd: "str | Path | None" = None) -> Install:
    """Find the recipe's generator code without importing it: this interpreter's import path
    first, then the current directory and ``PYTHONPATH``.  Code found with the recipe's
    distribution metadata carries its version; code found without any metadata is a source
    checkout (nothing to check the version against)."""
    from importlib.machinery import PathFinder
    from importlib.util import find_spec
    names = (recipe.module,) + tuple(recipe.alt_modules)
    hit = None
    for mod in names:
        try:
            folder = _spec_folder(find_spec(mod.split(".")[0]))
        except (ImportError, ValueError):
            folder = None
        if folder is not None:
            hit = (mod, folder, "interpreter path")
            break
    if hit is None:
        for folder, where in search_path(cwd):
            for mod in names:
                try:
                    found = _spec_folder(PathFinder.find_spec(mod.split(".")[0], [str(folder)]))
                except (ImportError, ValueError):
                    found = None
                if found is not None:
                    hit = (mod, found, where)
                    break
            if hit is not None:
                break
    version = owner = None
    if recipe.package:
        try:
            version = metadata.version(recipe.package)
        except metadata.PackageNotFoundError:
            version = None
    if hit is None:
        return Install(version=version)
    mod, folder, where = hit
    own = _owner(mod.split(".")[0], folder)
    if recipe.package and own is not None and _norm(own[0]) == _norm(recipe.package):
        version = own[1]
    elif own is not None:
        owner, version = f"{own[0]} {own[1]}", None
    elif where != "interpreter path":
        version = None               # a checkout next to the user, not the installed copy
    if where == "interpreter path" and folder == Path.cwd().resolve():
        where = "current directory"
    return Install(mod, folder, where, version, owner)


def installed_module(recipe: Recipe) -> Optional[str]:
    """The first of the recipe's module names found (see :func:`find_install`)."""
    return find_install(recipe).module


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
