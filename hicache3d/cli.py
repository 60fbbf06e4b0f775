"""The ``hicache3d`` command line."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import __version__


def _backend_names():
    """The bases registered now (:mod:`hicache3d.forecast.registry`), and ``auto``; imported
    when first needed, so that ``--help`` of other commands stays light."""
    from .forecast.registry import backend_names
    return backend_names()


class _BasisChoice(click.Choice):
    """``--backend``: the bases registered when the command runs, and ``auto``."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self):
        return _backend_names()

    @choices.setter
    def choices(self, value) -> None:
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hicache3d")
def main() -> None:
    """Training-free acceleration of image-to-3D flow-matching generators.

    Skips most network calls of a sampler and forecasts the velocity from the cached
    outputs of the computed steps (bases: reuse, taylor, hermite, dmd, auto).
    """


@main.command("demo")
@click.option("--backend", default="dmd", show_default=True,
              type=_BasisChoice())
@click.option("--interval", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--steps", default=25, show_default=True, type=click.IntRange(2, 1000))
def demo(backend: str, interval: int, steps: int) -> None:
    """Run a toy Euler sampler uncached and cached, and report calls saved and drift.

    \b
    Example:
      hicache3d demo --backend dmd --interval 5 --steps 50
    """
    import torch

    from . import CacheConfig, VelocityCache

    def sample(cache):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(64, 64, generator=g) / 8
        x = torch.randn(4, 64, generator=g)
        ts = torch.linspace(1, 0, steps + 1)
        calls = 0
        for i in range(steps):
            def net(x=x, t=ts[i]):
                nonlocal calls
                calls += 1
                return torch.tanh(x @ W) + t * x
            v = net() if cache is None else cache.step(ts[i], net)
            x = x - (ts[i] - ts[i + 1]) * v
        return x, calls

    ref, n_ref = sample(None)
    cache = VelocityCache(CacheConfig(backend=backend, interval=interval))
    out, n = sample(cache)
    drift = float((out - ref).norm() / ref.norm())
    click.echo(f"uncached: {n_ref} network calls")
    click.echo(f"{backend}, interval {interval}: {n} network calls "
               f"({n_ref - n} skipped), relative drift of the final sample {drift:.2e}")
    click.echo(f"forecasts: {cache.stats.summary()}")


def _parse_site_overrides(values):
    """``shape:interval=3,backend=taylor`` -> {"shape": {"interval": 3, "backend": "taylor"}}."""
    out = {}
    for v in values:
        if ":" not in v or "=" not in v:
            raise click.BadParameter(f"{v!r}: expected SITE:KEY=VALUE[,KEY=VALUE]", param_hint="--site")
        site, rest = v.split(":", 1)
        for kv in rest.split(","):
            k, _, val = kv.partition("=")
            k = k.strip().replace("-", "_")
            val = val.strip()
            for conv in (int, float):
                try:
                    val = conv(val)
                    break
                except ValueError:
                    continue
            if val in ("true", "false"):
                val = val == "true"
            out.setdefault(site.strip(), {})[k] = val
    return out


_BACKENDS = _BasisChoice()
# hicache3d.config.SCHEDULES, spelled out: importing the config here would import torch at start-up
_SCHEDULES = click.Choice(["fixed", "adaptive", "pattern"])
_TOLERANCE = click.FloatRange(0, None)
_SCHEDULE_HELP = ("fixed: one computed step in --interval; adaptive: each computed step measures "
                  "the forecast error and sizes the next forecast window to --tolerance; pattern: "
                  "the steps --pattern marks C are computed (`hicache3d tune --schedules pattern` "
                  "searches one on your model).")
_PATTERN_HELP = ("Computed/forecast pattern, one character per step (C computed, . forecast), e.g. "
                 "C.C.C...C.....C....C..C.C for 25 steps; repeat for other step counts. Implies "
                 "--schedule pattern. A run of a length no pattern has uses the adaptive schedule.")
_TOLERANCE_HELP = ("Adaptive schedule: the error budget of one forecast window (a relative "
                   "velocity error, dt-weighted; 0 computes every step, larger skips more).")


def _implied(settings: dict, where: str) -> dict:
    """A ``--site`` override with the schedule its keys ask for (as the options do)."""
    from .api import implied_schedule
    try:
        return implied_schedule(settings)
    except ValueError as e:
        raise click.UsageError(f"{where} {e}")


def _schedule_settings(interval, schedule, tolerance, pattern) -> dict:
    """The schedule keys the command-line options ask for: without --schedule, a pattern
    asks for the pattern schedule, an interval for the fixed cadence, a tolerance for the
    adaptive schedule (:func:`hicache3d.api.implied_schedule`)."""
    from .api import implied_schedule
    out = {k: v for k, v in dict(interval=interval, schedule=schedule, tolerance=tolerance).items()
           if v is not None}
    if pattern:
        out["pattern"] = tuple(pattern)
    try:
        return implied_schedule(out, spell=lambda key: f"--{key}")
    except ValueError as e:
        raise click.UsageError(str(e))


@main.command("patch")
@click.option("--model", "model", help="Recipe name (see `hicache3d recipes`).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="Your own recipe TOML instead of a known model (e.g. the generic adapter).")
@click.option("--backend", type=_BACKENDS, help="Forecast basis for every site.")
@click.option("--interval", type=click.IntRange(1, 1000), help="Compute one step in N.")
@click.option("--first-enhance", type=click.IntRange(0, 1000), help="Warm-up steps always computed.")
@click.option("--history", type=click.IntRange(1, 64), help="Snapshots kept per site.")
@click.option("--schedule", type=_SCHEDULES, help=_SCHEDULE_HELP)
@click.option("--tolerance", type=_TOLERANCE, help=_TOLERANCE_HELP)
@click.option("--pattern", multiple=True, metavar="C.C..C", help=_PATTERN_HELP)
@click.option("--site", "site_overrides", multiple=True, metavar="SITE:KEY=VALUE",
              help="Per-site override, e.g. --site shape:interval=3,backend=taylor (repeatable).")
@click.option("--settings", "settings_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Per-site settings written by `hicache3d tune` (OUT/settings.toml); the options "
                   "above, given too, win over the file's values.")
@click.option("--force", is_flag=True, help="Patch even if the generator is missing or its version is outside the supported range.")
@click.option("--user", is_flag=True, help="Write into the user site-packages instead of the active environment.")
def patch_cmd(model, recipe_path, backend, interval, first_enhance, history, schedule, tolerance,
              pattern, site_overrides, settings_path, force, user):
    """Accelerate an installed generator in place, for every later Python process.

    Writes a one-line .pth file and a config into the active environment's
    site-packages; when the generator's module is imported, its sampler is patched.
    Nothing of the generator's code is edited; `hicache3d unpatch` removes every trace.
    Set HICACHE3D_DISABLE=1 to run one process unpatched.

    \b
    Examples:
      hicache3d patch --model hunyuan3d-2mini --backend dmd --interval 5
      hicache3d patch --model trellis2 --site shape_slat:interval=4
      hicache3d patch --model trellis --schedule adaptive --tolerance 0.5
      hicache3d patch --model hunyuan3d-2mini --pattern C.C.C...C.....C....C..C.C
      hicache3d patch --model trellis2 --settings tune/settings.toml
      hicache3d patch --recipe my_sampler.toml
    """
    from .inplace import InPlaceError, write_patch
    from .recipe import RecipeError
    if bool(model) == bool(recipe_path):
        raise click.UsageError("give exactly one of --model NAME or --recipe FILE.toml")
    try:
        recipe, ref = _patch_recipe(model, recipe_path)
        common = {k: v for k, v in dict(backend=backend, first_enhance=first_enhance,
                                         history=history).items() if v is not None}
        common.update(_schedule_settings(interval, schedule, tolerance, pattern))
        sites = {s: _implied(v, f"--site {s}:") for s, v in _parse_site_overrides(site_overrides).items()}
        source = None
        if settings_path is not None:
            from .settings_file import load_settings
            f = load_settings(settings_path, recipe)
            for s, v in f.sites.items():
                sites[s] = {**dict(v), **common, **sites.get(s, {})}
            source = {"path": str(f.path), "tune": dict(f.tune)}
        recipe.with_settings(common, sites)              # validates every value
        recipe, also, checkout = _check_install(recipe, force, validate_targets=bool(recipe_path))
        path, previous = write_patch(recipe, ref, common, sites, force, user, also=also,
                                     checkout=checkout, settings_file=source)
    except (RecipeError, InPlaceError, ValueError) as e:
        raise click.ClickException(str(e))
    if previous is not None:
        was = {k: previous.get(k) for k in ("settings", "sites") if previous.get(k)}
        click.echo(f"note: {recipe.name} was already patched; its earlier settings "
                   f"({was or 'recipe defaults'}) are replaced by these", err=True)
    click.echo(f"patched {recipe.name} in place ({path}); every new Python process that "
               f"imports {' or '.join([recipe.module, *also])} runs accelerated")
    if settings_path is not None:
        click.echo(f"settings per site from {source['path']}: " + "; ".join(
            f"{s} {v}" for s, v in sites.items()))


def _patch_recipe(model, recipe_path):
    """The recipe to patch and the reference stored in the config (a name, or a file path)."""
    from .recipe import RecipeError, builtin_names, get_recipe, load_recipe
    if model:
        if model.endswith(".toml") or "/" in model or os.sep in model:
            raise RecipeError(f"--model takes a recipe name (see `hicache3d recipes`); for a "
                              f"file use --recipe {model}")
        return get_recipe(model), model
    path = Path(recipe_path).resolve()
    recipe = load_recipe(path)
    if recipe.name in builtin_names():
        raise RecipeError(f"recipe {path} is named {recipe.name!r}, like a built-in recipe; give "
                          f"it a name of its own (name = \"my-{recipe.name}\") so that both "
                          f"can be patched and told apart")
    from .patches import adapter_class
    adapter_class(recipe.adapter)                        # a clear error for an unknown adapter
    return recipe, str(path)


def _check_install(recipe, force, validate_targets):
    """Find the generator (this interpreter's path, the current directory, PYTHONPATH),
    check its version where distribution metadata exists, and (for a user's recipe) that
    its targets stay inside its own package and resolve.  Returns the recipe for the module
    name found, the other module names to hook, and the source checkout found (or None)."""
    from .recipe import find_install, for_module, version_in_range
    _check_scope(recipe)
    inst = find_install(recipe)
    if inst.found:
        recipe = for_module(recipe, inst.module)
    problem = None
    if inst.owner is not None and recipe.package:
        problem = (f"{inst.package_dir} belongs to {inst.owner}, not to {recipe.package} "
                   f"(the {recipe.name} recipe's distribution): is this the right model?")
    elif inst.version is not None and recipe.versions and not version_in_range(inst.version, recipe.versions):
        problem = f"{recipe.package} {inst.version} is outside the supported range {recipe.versions}"
    if problem is not None:
        if not force:
            raise click.ClickException(f"{problem}; pass --force to patch anyway")
        click.echo(f"warning: {problem}; patching anyway (--force)", err=True)
    also, checkout = (), None
    if inst.source_checkout:
        checkout = str(inst.package_dir)
        click.echo(f"note: {recipe.module} is a source checkout at {inst.package_dir} (found in the "
                   f"{inst.where}; no distribution metadata, so no version check); the sampler's "
                   f"signature is checked when it is imported", err=True)
    elif not inst.found:
        also = tuple(recipe.alt_modules)
        names = " or ".join((recipe.module,) + also)
        click.echo(f"note: {names} is not importable here (looked in this interpreter's path, "
                   f"the current directory and PYTHONPATH); the patch applies when a process "
                   f"imports it, e.g. a script run from the generator's source checkout", err=True)
    if validate_targets and inst.found:
        _check_targets(recipe, None if inst.where == "interpreter path" else inst.folder)
    return recipe, also, checkout


def _check_scope(recipe):
    """A recipe may only patch code of its own generator: never the standard library, nor
    hicache3d's own engine (the bundled generator excepted)."""
    from .recipe import RecipeError
    mods = {recipe.module, *recipe.alt_modules}
    for target in [recipe.run or ""] + [s.step or "" for s in recipe.sites]:
        if ":" in target:
            mods.add(target.split(":", 1)[0])
    for mod in sorted(mods):
        top = mod.split(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names:
            raise RecipeError(f"recipe {recipe.name!r} targets {mod!r}, a module of Python's "
                              f"standard library: patching it would change every program in "
                              f"this environment; point module/run/step at the generator's code")
        if top == "hicache3d" and not mod.startswith("hicache3d.bundled"):
            raise RecipeError(f"recipe {recipe.name!r} targets {mod!r}, part of hicache3d itself")
    own = {recipe.module.split(".")[0], *(m.split(".")[0] for m in recipe.alt_modules)}
    for mod in sorted(mods):
        if mod.split(".")[0] not in own:
            raise RecipeError(f"recipe {recipe.name!r}: target module {mod!r} is outside the "
                              f"recipe's package {' / '.join(sorted(own))}; a recipe patches only "
                              f"its own generator's code")


def _check_targets(recipe, folder=None):
    """Import the user recipe's module (from ``folder``, where it was found, if not on this
    interpreter's path) and resolve its run and step targets."""
    from .patches import adapter_class
    from .patches.base import resolve
    from .recipe import RecipeError
    if folder is not None:
        sys.path.insert(0, str(folder))
    try:
        adapter = adapter_class(recipe.adapter)(recipe)
        adapter.run_target()
        for s in recipe.sites:
            if s.step:
                resolve(recipe, s.step)
    except RecipeError:
        raise
    except Exception as e:              # importing the user's module failed
        click.echo(f"note: could not import {recipe.module} to check the recipe's targets "
                   f"({type(e).__name__}: {e}); they are checked when a process imports it", err=True)
    finally:
        if folder is not None and str(folder) in sys.path:
            sys.path.remove(str(folder))


@main.command("unpatch")
@click.option("--model", "models", multiple=True, help="Model to unpatch (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Remove every in-place patch.")
@click.option("--user", is_flag=True, help="The user site-packages instead of the active environment.")
def unpatch_cmd(models, all_, user):
    """Undo `hicache3d patch`: remove the config entry and, with the last one, both files."""
    from .inplace import remove_patch, site_dir
    if not models and not all_:
        raise click.UsageError("give --model NAME or --all")
    removed, deleted = remove_patch(None if all_ else list(models), user)
    missing = sorted(set(models) - set(removed))
    for n in removed:
        click.echo(f"unpatched {n}")
    for p in deleted:
        click.echo(f"removed {p}")
    if all_ and not removed and not deleted:
        click.echo(f"nothing was patched in place ({site_dir(user)}): nothing to undo")
    if missing:
        raise click.ClickException(f"not patched: {', '.join(missing)}")


@main.command("status")
@click.option("--user", is_flag=True, help="The user site-packages instead of the active environment.")
def status_cmd(user):
    """Show what is patched in place, with which settings, and where the files are."""

    from ._bootstrap import PTH_NAME, disabled
    from .inplace import read_patches
    try:
        path, models = read_patches(user)
    except Exception as e:
        raise click.ClickException(f"broken config: {e}")
    if not models:
        click.echo(f"nothing patched in place ({path.parent})")
        return
    pth = path.parent / PTH_NAME
    click.echo(f"config: {path}")
    click.echo(f"start-up hook: {pth}{'' if pth.exists() else ' (MISSING: run patch again)'}")
    if disabled():
        click.echo("HICACHE3D_DISABLE is set: this process runs unpatched")
    for name, entry in sorted(models.items()):
        also = [m for m in entry.get("also", []) if isinstance(m, str)]
        click.echo(f"- {name} (module {' or '.join([entry['module'], *also])}, recipe {entry['recipe']})")
        click.echo(f"    generator: {_install_state(entry['recipe'], entry.get('checkout'))}")
        click.echo(f"    settings: {entry.get('settings') or 'recipe defaults'}")
        src = entry.get("settings_file")
        if isinstance(src, dict) and src.get("path"):
            info = src.get("tune") or {}
            tuned = ", ".join(f"{k} {info[k]}" for k in ("target", "steps", "images", "created") if k in info)
            click.echo(f"    settings file: {src['path']}" + (f" (hicache3d tune: {tuned})" if tuned else ""))
        for site, ov in (entry.get("sites") or {}).items():
            click.echo(f"    site {site}: {ov}")
        if entry.get("force"):
            click.echo("    forced (version check overridden)")


def _install_state(recipe, recorded=None) -> str:
    """One phrase: where the recipe's generator is, as this process sees it."""
    from .recipe import RecipeError, find_install, get_recipe, version_in_range
    try:
        recipe = get_recipe(recipe)
    except (RecipeError, TypeError) as e:
        return f"recipe unreadable ({e})"
    inst = find_install(recipe)
    if inst.found and inst.module.split(".")[0] == "hicache3d":
        return "shipped with hicache3d"
    if inst.source_checkout:
        return f"source checkout at {inst.package_dir}"
    if inst.version is not None and recipe.package:
        ok = not recipe.versions or version_in_range(inst.version, recipe.versions)
        return f"{recipe.package} {inst.version} ({'supported' if ok else 'outside ' + recipe.versions})"
    if inst.owner is not None:
        return f"{inst.module} from {inst.owner}" + (f" (not {recipe.package})" if recipe.package else "")
    if inst.found:
        return f"{inst.module} at {inst.folder}"
    if recorded:
        return f"not importable here; patched from the source checkout at {recorded}"
    return "not installed (or not importable from here)"


def _schedule_label(c) -> str:
    """``dmd/5`` (fixed interval), ``hermite adaptive tol 2``, ``hermite pattern 12/25/50
    steps``."""
    if c.schedule == "adaptive":
        return f"{c.backend} adaptive tol {c.tolerance:g}"
    if c.schedule == "pattern":
        return f"{c.backend} pattern {'/'.join(str(len(p)) for p in sorted(c.pattern, key=len))} steps"
    return f"{c.backend}/{c.interval}"


@main.command("recipes")
def recipes_cmd():
    """List the known models, whether each is installed, and its version vs the supported range."""
    from .recipe import known_recipes
    for name, r in sorted(known_recipes().items()):
        state = _install_state(r)
        sites = ", ".join(f"{s.name}: {_schedule_label(s.config)}" for s in r.sites)
        click.echo(f"{name:18s} {state:40s} sites [{sites}]  {r.description}")


_SEEDS = click.IntRange(0, 2 ** 63 - 1)


@main.command("generate")
@click.option("--image", "image", required=True, type=click.Path(path_type=Path),
              help="Input image (PNG, JPEG or WebP), or a folder of them.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Output mesh (.glb .obj .ply .stl), or a folder when --image is a folder.")
@click.option("--model", default="bundled", show_default=True,
              help="Recipe whose generator makes the mesh: bundled, hunyuan3d-2mini, hunyuan3d-2.1, "
                   "trellis, trellis2, sam3d (see `hicache3d recipes`). The TRELLIS / TRELLIS.2 mesh decoders "
                   "need CUDA (on CPU the samplers run, the mesh is not written); SAM 3D needs CUDA throughout.")
@click.option("--weights", help="Local weights: a folder for upstream models (default: the recipe's "
                                "hub repo; wins over HY3DGEN_MODELS; TRELLIS/TRELLIS.2: pipeline.json + ckpts/, "
                                "SAM 3D: checkpoints/pipeline.yaml), a .safetensors file for the bundled one.")
@click.option("--backend", type=_BACKENDS, help="Forecast basis (default: the recipe's).")
@click.option("--interval", type=click.IntRange(1, 1000), help="Compute one step in N (default: the recipe's).")
@click.option("--schedule", type=_SCHEDULES, help=_SCHEDULE_HELP + " Default: the recipe's.")
@click.option("--tolerance", type=_TOLERANCE, help=_TOLERANCE_HELP)
@click.option("--pattern", multiple=True, metavar="C.C..C", help=_PATTERN_HELP)
@click.option("--steps", type=click.IntRange(1, 1000), help="Sampling steps (default: the model's).")
@click.option("--seed", default=0, show_default=True, type=_SEEDS, help="Noise seed (0 to 2^63-1).")
@click.option("--no-cache", is_flag=True, help="Run the generator unaccelerated (whatever is patched in place).")
@click.option("--compare", "do_compare", is_flag=True,
              help="Also run uncached (really uncached, whatever is patched) and report speed-up and drift.")
@click.option("--format", "fmt", default="glb", show_default=True, type=click.Choice(["glb", "obj", "ply", "stl"]),
              help="Mesh format when writing into a folder.")
@click.option("--overwrite", is_flag=True,
              help="Folder mode: regenerate meshes that already exist (default: skip them, so a rerun resumes).")
def generate_cmd(image, out, model, weights, backend, interval, schedule, tolerance, pattern, steps, seed,
                 no_cache, do_compare, fmt, overwrite):
    """Make a mesh from an image (the bundled generator needs no GPU and no download).

    A folder in and a folder out runs resumably: meshes that exist and load are
    skipped, each image appends a record to OUT/records.jsonl, a summary goes to
    OUT/summary.md, and a bad image is reported and skipped (exit status 1 at the
    end).  Under torchrun or accelerate launch each process takes its share of the
    images and runs on its own device; rank 0 prints the summary.

    \b
    Examples:
      hicache3d generate --image mug.png --out mug.glb
      hicache3d generate --image mug.jpg --out mug.obj --backend dmd --interval 4 --compare
      hicache3d generate --image mug.png --out mug.glb --schedule adaptive --tolerance 1.0
      hicache3d generate --image photos/ --out meshes/ --format ply
      hicache3d generate --image cutout.png --out x.glb --model trellis2 --weights TRELLIS.2-4B/
      torchrun --nproc_per_node 4 -m hicache3d generate --image photos/ --out meshes/
    """
    from .generate import GenerateError
    from .mesh import MeshError
    from .recipe import RecipeError
    if no_cache and do_compare:
        raise click.UsageError("--compare already runs the generator uncached next to the accelerated "
                               "run; give --compare alone (or --no-cache alone for the uncached mesh only)")
    settings = {"backend": backend} if backend is not None else {}
    settings.update(_schedule_settings(interval, schedule, tolerance, pattern))
    try:
        if image.is_dir():
            failed = _generate_folder_cli(image, out, model, weights, settings, steps, seed, no_cache,
                                          do_compare, fmt, overwrite)
            if failed:
                raise click.exceptions.Exit(1)
            return
        _generate_one_cli(image, out, model, weights, settings, steps, seed, no_cache, do_compare)
    except (GenerateError, MeshError, RecipeError, ValueError) as e:
        raise click.ClickException(str(e))


def _generate_one_cli(image, out, model, weights, settings, steps, seed, no_cache, do_compare):
    from tqdm import tqdm

    from .folder import ensure_writable_folder
    from .generate import GenerateError, Generator, list_images, load_image
    from .mesh import compare_meshes, export_mesh, mesh_format
    list_images(image)
    mesh_format(out)
    if out.is_dir():
        raise GenerateError(f"--out {out} is a folder; give a mesh file name such as {out / 'mesh.glb'} "
                            f"(a folder --out needs a folder --image)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise GenerateError(f"cannot write {out}: folder {folder} does not exist")
    ensure_writable_folder(folder, f"cannot write {out}: folder")
    img = load_image(image)                        # decoded once, untimed
    gen = Generator(model, weights)
    payload = gen.prepare(image, img)
    gen.warmup()
    ref = gen.run(payload, steps=steps, seed=seed, cache=False) if do_compare else None
    label = image.name + ("" if no_cache else " (accelerated)")
    with tqdm(total=steps or 0, desc=label, unit="step", file=sys.stderr, disable=None, leave=False) as bar:
        def progress(i, n):
            bar.total = n
            bar.update(1)
        res = gen.run(payload, steps=steps, seed=seed, cache=not no_cache, settings=settings,
                      progress=progress)
    if res.mesh is None and res.reason:           # an upstream decoder cannot run here
        _upstream_stop_cli(image, out, res, ref, no_cache)
    if res.mesh is None:
        raise GenerateError(f"{image}: the generator produced no surface")
    export_mesh(res.mesh, out)
    line = f"{out}: {res.seconds:.2f} s, {res.network_calls} network calls"
    if not no_cache:
        line += f", {res.skipped_calls} step{'' if res.skipped_calls == 1 else 's'} skipped"
    if ref is not None:
        m = compare_meshes(res.mesh, ref.mesh)
        line += f"; uncached {ref.seconds:.2f} s, {ref.network_calls} network calls: "
        if res.skipped_calls:
            line += (f"speed-up {ref.seconds / max(res.seconds, 1e-9):.2f}x "
                     f"({ref.network_calls / max(res.network_calls, 1):.2f}x fewer calls)")
        else:
            line += "no speed-up"
        line += (f"; vs uncached Chamfer {m['chamfer']:.4f}, F@{m['tau']:g} {m['fscore']:.3f}, "
                 f"IoU {m['iou']:.3f}")
    click.echo(line)
    for site_line in _site_patterns(res):
        click.echo(site_line)
    if not no_cache and not res.skipped_calls:
        click.echo("note: no step was skipped (the run is no longer than the warm-up and "
                   "interval allow), so this mesh is the uncached computation; use more --steps "
                   "or a smaller --interval", err=True)


def _upstream_stop_cli(image, out, res, ref, no_cache):
    """The samplers ran but a decoder cannot run here: say what ran (and, with --compare,
    each site's final-latent drift vs uncached), then stop with the reason."""
    from .generate import GenerateError, latent_drift
    line = f"{image.name}: sampled in {res.seconds:.2f} s, {res.network_calls} network calls"
    if not no_cache:
        line += f", {res.skipped_calls} step{'' if res.skipped_calls == 1 else 's'} skipped"
    if ref is not None:
        line += f"; uncached {ref.seconds:.2f} s, {ref.network_calls} network calls"
        drifts = []
        for site in (s for s in res.latents if s in ref.latents):
            try:
                drifts.append(f"{site} {latent_drift(res.latents[site], ref.latents[site]):.4f}")
            except GenerateError:      # an earlier site's drift changed this one's sparse structure
                drifts.append(f"{site} n/a ({_latent_size(res.latents[site])} vs "
                              f"{_latent_size(ref.latents[site])} voxels)")
        if drifts:
            line += "; final-latent drift vs uncached: " + ", ".join(drifts)
    click.echo(line)
    for site_line in _site_patterns(res):
        click.echo(site_line)
    raise GenerateError(f"{out} not written: {res.reason}")


def _latent_size(x) -> int:
    feats = getattr(x, "feats", x)
    return int(feats.shape[-2]) if hasattr(feats, "shape") and len(feats.shape) >= 2 else 0


def _generate_folder_cli(image, out, model, weights, settings, steps, seed, no_cache, do_compare,
                         fmt, overwrite) -> int:
    """Folder mode; returns the number of failed images (of every process, on rank 0)."""
    from .folder import ProcessGroup, generate_folder, launcher_env, write_summary
    from .generate import GenerateError, default_device
    if out.suffix and not out.is_dir():
        raise GenerateError(f"--image is a folder, so --out must be a folder, got {out}")
    rank, world, local = launcher_env()
    device = default_device(local)
    with ProcessGroup(rank, world, device) as pg:
        res = generate_folder(image, out, model=model, weights=weights, settings=settings,
                              steps=steps, seed=seed, fmt=fmt, cache=not no_cache,
                              compare=do_compare, overwrite=overwrite, rank=rank,
                              world_size=world, device=device, say=click.echo)
        everyone = pg.gather(res)
    if everyone is None:                             # not rank 0: its lines are printed
        return res.failed
    path = write_summary(everyone, out)
    done = sum(r.done for r in everyone)
    skipped = sum(r.skipped for r in everyone)
    failed = sum(r.failed for r in everyone)
    click.echo(f"{done} done, {skipped} skipped (already there; --overwrite regenerates), "
               f"{failed} failed; records in {out / 'records.jsonl'}, summary in {path}")
    if pg.note:
        click.echo(f"note: {pg.note}", err=True)
    for r in everyone:
        for rec in r.records:
            if rec["status"] == "failed":
                click.echo(f"failed: {rec['error']}", err=True)
    return failed


def _site_patterns(res) -> list:
    """``  site: C computed / . forecast pattern, why steps were computed`` per site of the
    last run, and a warning line when a site ran the network on only a handful of steps."""
    stats = getattr(res, "stats", None) or {}
    runs = stats.get("runs") or []
    out = []
    for site, d in (runs[-1]["sites"].items() if runs else []):
        if not d.get("pattern"):
            continue
        why = ", ".join(f"{k} {v}" for k, v in sorted(d.get("reasons", {}).items(), key=lambda kv: -kv[1]))
        out.append(f"  {site}: {d['pattern']}  ({d['computed']} computed: {why})")
        from .cache import HANDFUL
        if d["computed"] < HANDFUL and d["forecast"] > d["computed"]:
            out.append(f"  warning: {site} ran the network on only {d['computed']} of {d['steps']} "
                       f"steps; lower --interval / --tolerance")
    return out


@main.command("compare")
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option("--tau", default=0.05, show_default=True, type=float, help="F-score distance threshold (unit cube).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare_cmd(a, b, tau, as_json):
    """Chamfer distance, F-score@tau and voxel IoU of two meshes, each normalised to the
    unit cube.

    \b
    Example:
      hicache3d compare cached.glb uncached.glb --json
    """
    import json as _json

    from .mesh import MeshError, compare_meshes, load_mesh
    try:
        m = compare_meshes(load_mesh(a), load_mesh(b), tau=tau)
    except MeshError as e:
        raise click.ClickException(str(e))
    if as_json:
        click.echo(_json.dumps(m, indent=2))
    else:
        click.echo(f"Chamfer {m['chamfer']:.5f}  F@{tau:g} {m['fscore']:.4f} "
                   f"(precision {m['precision']:.4f}, recall {m['recall']:.4f})  IoU {m['iou']:.4f}")


def _int_list(value: str):
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers")


@main.command("bench")
@click.option("--model", default="bundled", show_default=True, help="Only the bundled generator is swept (other models: `hicache3d tune`).")
@click.option("--backends", default="reuse,taylor,hermite,dmd,auto", show_default=True)
@click.option("--intervals", default="2,3,4,5,6", show_default=True)
@click.option("--steps", "steps", default="12,25,50", show_default=True)
@click.option("--images", type=click.Path(exists=True, path_type=Path),
              help="Folder of PNGs (default: the bundled generator's held-out shapes).")
@click.option("--shapes", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Held-out shapes to use when no --images are given.")
@click.option("--seed", default=0, show_default=True, type=_SEEDS)
@click.option("--out", default=Path("bench-results"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for the reports (checked before the sweep; partial results are kept there).")
def bench_cmd(model, backends, intervals, steps, images, shapes, seed, out):
    """The table to pick settings for a model: fidelity (F-score, Chamfer, IoU, latent L2
    vs the uncached result of the same seed), network forwards and wall time, per basis and
    interval.  Writes JSON, Markdown and a fidelity-vs-speed plot (PNG; needs matplotlib).

    \b
    Example:
      hicache3d bench --backends reuse,dmd,auto --intervals 2,4,6 --steps 25 --shapes 16
    """
    from .bench import run_sweep, write_reports
    if model != "bundled":
        raise click.ClickException(f"bench sweeps the bundled generator; for {model} measure and pick "
                                   f"settings on your own images with `hicache3d tune --model {model} "
                                   f"--images DIR`")
    bk = [b.strip() for b in backends.split(",") if b.strip()]
    bad = [b for b in bk if b not in _backend_names()]
    if bad or not bk:
        raise click.BadParameter(f"unknown backend(s) {', '.join(bad) or '(none)'}", param_hint="--backends")
    ivs, sts = _int_list(intervals), _int_list(steps)
    if not ivs or min(ivs) < 1 or not sts or min(sts) < 2:
        raise click.BadParameter("intervals must be >= 1 and steps >= 2")
    from .folder import ensure_writable_folder
    from .generate import GenerateError, list_images
    try:
        if images is not None:
            if not images.is_dir():
                raise GenerateError(f"--images {images} is not a folder")
            list_images(images)
        ensure_writable_folder(out, "--out")
    except GenerateError as e:
        raise click.ClickException(str(e))
    partial = out / "fidelity.partial.json"
    try:
        res = run_sweep(bk, ivs, sts, shapes_n=shapes, images=images, seed=seed,
                        progress=lambda s: click.echo(s, err=True),
                        checkpoint=lambda r: _write_partial(partial, r))
    except (ValueError, GenerateError) as e:
        raise click.ClickException(str(e))
    except KeyboardInterrupt:
        if partial.exists():
            click.echo(f"interrupted; the rows finished so far are in {partial}", err=True)
        raise
    try:
        written = write_reports(res, out)
    except OSError as e:
        try:
            _write_partial(partial, res)
            kept = f"the results are in {partial}"
        except OSError:
            kept = "the results could not be saved either"
        raise click.ClickException(f"cannot write the reports into {out} ({e.strerror or e}); {kept}")
    if partial.exists():
        partial.unlink()
    for p in written:
        click.echo(f"wrote {p}")


def _write_partial(path: Path, res) -> None:
    """The sweep so far, written atomically (survives an interrupted or failed sweep)."""
    import json as _json

    from .mesh import atomic_write
    atomic_write(path, (_json.dumps(dict(res, partial=True), indent=1, default=float) + "\n").encode())


def _float_list(value: str, name: str):
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers", param_hint=name)


@main.command("tune")
@click.option("--model", required=True, help="Recipe name (see `hicache3d recipes`).")
@click.option("--images", "images", required=True, type=click.Path(path_type=Path),
              help="A folder of your images (PNG, JPEG, WebP), or one image.")
@click.option("--weights", help="Local weights (as for `generate`): a folder for upstream models, "
                                "a .safetensors file for the bundled one.")
@click.option("--steps", type=click.IntRange(2, 1000), help="Sampling steps (default: the model's).")
@click.option("--seed", default=0, show_default=True, type=_SEEDS)
@click.option("--backends", default="hermite,dmd,auto", show_default=True, help="Bases to sweep.")
@click.option("--schedules", default="fixed,adaptive", show_default=True,
              help="Schedules to sweep: fixed, adaptive, and pattern (a search for the best "
                   "computed/forecast pattern per site at --steps: about steps + 2 x removals "
                   "more runs, e.g. 80 at 25 steps).")
@click.option("--pattern-backend", type=_BACKENDS,
              help="Basis of the pattern search (default: that of the site's fastest fixed/adaptive "
                   "setting meeting the target).")
@click.option("--intervals", default="2,3,4,5,6", show_default=True, help="Fixed-schedule intervals.")
@click.option("--tolerances", default="0.25,0.5,1,2,4", show_default=True, help="Adaptive-schedule tolerances.")
@click.option("--sites", help="Only these sites (comma-separated; default: every site of the recipe).")
@click.option("--target-iou", default=0.98, show_default=True, type=click.FloatRange(0, 1),
              help="Where a mesh is made: mean voxel IoU vs uncached the settings must keep.")
@click.option("--target-drift", default=0.05, show_default=True, type=click.FloatRange(0, None),
              help="Where no mesh is made: the largest mean relative L2 of a site's final latent.")
@click.option("--rank-by", default="forwards", show_default=True, type=click.Choice(["forwards", "seconds"]),
              help="Fastest = fewest network forwards (exact; ties by wall time), or lowest wall time.")
@click.option("--out", default=Path("tune"), show_default=True, type=click.Path(path_type=Path),
              help="Folder for tune.json, tune.md, pareto-SITE.png, settings.toml and runs/.")
def tune_cmd(model, images, weights, steps, seed, backends, schedules, pattern_backend, intervals, tolerances,
             sites, target_iou, target_drift, rank_by, out):
    """Measure which cache settings each site of your model takes, on your images, and
    write the fastest that meet a fidelity target.

    Per site, every basis x interval (fixed schedule) and basis x tolerance (adaptive)
    runs with that site cached and the others uncached (with --schedules ...,pattern also
    a search for the best computed/forecast pattern, removing one computed step at a time
    while the target holds), then the chosen settings of all sites together; each run is compared with the uncached run of the same seed and
    images: final-latent drift per site, mesh Chamfer / F-score / IoU where the pipeline
    makes a mesh, network forwards and end-to-end wall time (decoders included).
    TRELLIS v1 / TRELLIS.2 on a machine without CUDA stop before their CUDA-only mesh
    decoders: the tune then measures latent drift and sampler-only time, says so, and
    chooses by --target-drift; SAM 3D needs CUDA to load at all.
    Interrupted, the same command resumes from the runs already measured (OUT/runs/).

    \b
    Examples:
      hicache3d tune --model bundled --images photos/ --steps 12 --out tune/
      hicache3d tune --model bundled --images photos/ --schedules fixed,adaptive,pattern
      hicache3d tune --model hunyuan3d-2mini --images photos/ --weights ~/models --backends dmd,auto
      hicache3d tune --model trellis2 --images photos/ --weights TRELLIS.2-4B/ --steps 12
      hicache3d patch --model bundled --settings tune/settings.toml
    """
    from .folder import ensure_writable_folder
    from .generate import GenerateError, list_images
    from .tune import tune
    from .tune_pipelines import TuneError, make_pipeline
    bk = [b.strip() for b in backends.split(",") if b.strip()]
    bad = [b for b in bk if b not in _backend_names()]
    if bad or not bk:
        raise click.BadParameter(f"unknown backend(s) {', '.join(bad) or '(none)'}", param_hint="--backends")
    sch = [s.strip() for s in schedules.split(",") if s.strip()]
    from .config import SCHEDULES
    if not sch or set(sch) - set(SCHEDULES):
        raise click.BadParameter(f"{schedules!r}: use {', '.join(SCHEDULES)} or several",
                                 param_hint="--schedules")
    ivs, tols = _int_list(intervals), _float_list(tolerances, "--tolerances")
    if "fixed" in sch and (not ivs or min(ivs) < 1):
        raise click.BadParameter("intervals must be >= 1", param_hint="--intervals")
    if "adaptive" in sch and (not tols or min(tols) < 0):
        raise click.BadParameter("tolerances must be >= 0", param_hint="--tolerances")
    try:
        if not images.exists():
            raise GenerateError(f"--images {images} does not exist")
        paths = list_images(images)
        ensure_writable_folder(out, "--out")
        pipe = make_pipeline(model, weights)
        res = tune(pipe, paths, out, steps=steps, seed=seed, backends=bk, schedules=sch, intervals=ivs,
                   tolerances=tols, target_iou=target_iou, target_drift=target_drift, rank_by=rank_by,
                   sites=[s.strip() for s in sites.split(",") if s.strip()] if sites else None,
                   pattern_backend=pattern_backend, progress=True, say=lambda s: click.echo(s, err=True))
    except (GenerateError, TuneError, ValueError) as e:
        raise click.ClickException(str(e))
    except KeyboardInterrupt:
        click.echo(f"interrupted; the runs measured so far are kept in {out / 'runs'}: run the same "
                   f"command again to resume", err=True)
        raise click.exceptions.Exit(130)
    by_id = {r["id"]: r for r in res["rows"]}
    ref = res["reference"]
    timing = res.get("timing") or "end to end"
    if res.get("no_mesh_reason"):
        click.echo(f"note: {res['no_mesh_reason']}; measured the latent drift and the forwards / time up to "
                   f"the decoder (speed-ups are {timing}, not end to end); chosen by the latent-drift target")
    for site in res["sites"]:
        c = by_id.get(res["chosen"][site] or "")
        if c is None:
            click.echo(f"{site}: no setting met the target ({res['target']['describe']}); left uncached")
        else:
            from .tune import setting_label
            q = f", IoU {c['iou_mean']:.4f}" if c.get("iou_mean") is not None else ""
            click.echo(f"{site}: {setting_label(c['settings'])}: {c['forwards']}/{ref['forwards']} forwards "
                       f"({c['forward_ratio']:.2f}x fewer), {c['speedup']:.2f}x {timing}, drift {c['drift']:.4f}{q}")
    cb = res["combined"]
    q = f", IoU {cb['iou_mean']:.4f}" if cb.get("iou_mean") is not None else ""
    d = "n/a" if cb["drift"] is None else f"{cb['drift']:.4f}"
    click.echo(f"together: {cb['forwards']}/{ref['forwards']} forwards, {cb['speedup']:.2f}x {timing}, "
               f"drift {d}{q} ({'meets' if res['combined_meets_target'] else 'MISSES'} the target)")
    click.echo(f"{res['runs_measured_now']} runs measured, {res['runs_resumed']} reused; wrote "
               f"{out / 'tune.md'}, {out / 'settings.toml'}; apply with: hicache3d patch --model "
               f"{res['model']} --settings {out / 'settings.toml'}")
