"""The workflow's settings, checked before any job runs, with errors a person can act on.

``rules/common.smk`` layers the settings (a preset's files, then the user's --configfile and
--config), checks them against config/schema.yaml, resolves data_root and fits the per-job
requests to the run with these functions, on plain data, so tests/unit/core/test_settings.py
pins the messages without Snakemake.  jsonschema's own message dumps the whole schema and config
(80-750 lines); here a typo gets the nearest valid key, a wrong value what is expected, in one
line (jsonschema, of the ``workflow`` extra only, is imported where it is used).
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitsnet.core.io import KitsnetError

if TYPE_CHECKING:
    import jsonschema

Origin = Callable[[list], str]  # which file or flag set a config key path ("--config", ...)
Sources = list[tuple[str, dict]]  # (label, settings) of each source, lowest precedence first

# Where each dataset's labels come from: the organisers' repository, and its data folder.
KITS_SOURCES = {
    "kits21": ("https://github.com/neheller/kits21", "kits21/data"),
    "kits23": ("https://github.com/neheller/kits23", "dataset"),
}


class ConfigError(KitsnetError):
    """A mistake in the settings, named with its source and fix (common.smk: a WorkflowError)."""


# ------------------------------------------------------------------ presets, layered
def nearest(word: object, choices: Iterable[object]) -> str | None:
    """The closest of ``choices`` to a misspelt ``word`` (difflib's ratio >= 0.6), or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return close[0] if close else None


def choose_preset(user: Mapping[str, Any], presets: Collection[str]) -> str:
    """The preset the user's settings name (default: the demo).  The preset is a key, so an
    extra --configfile cannot silently switch the paper's run back to the demo."""
    preset = user.get("preset", "demo")
    if preset not in presets:
        guess = nearest(preset, presets)
        raise ConfigError(
            f"preset: {preset!r} is not one of {', '.join(presets)}"
            + (f"; did you mean {guess!r}?" if guess else "")
        )
    return preset


def layer(base: Any, top: Mapping[str, Any]) -> Any:
    """A new mapping: ``base`` with ``top`` on it, nested mappings merged key by key and every
    other value replaced (a ``base`` that is not a mapping counts as empty, unless ``top`` is
    empty too: then ``base`` stays).  The same rule as Snakemake's merging of --configfile and
    --config, so a preset's files layer exactly as the user's own do
    (tests/unit/core/test_settings.py compares the two)."""
    if not top:
        return base
    merged = dict(base) if isinstance(base, Mapping) else {}
    for key, value in top.items():
        merged[key] = layer(merged.get(key), value) if isinstance(value, Mapping) else value
    return merged


def assemble_settings(preset: str, files: Iterable[Mapping], user: Mapping) -> dict:
    """The settings of a run: the preset's ``files`` in order, then the ``user``'s on top."""
    merged: dict = {}
    for settings in [*files, user]:
        merged = layer(merged, settings)
    merged["preset"] = preset
    return merged


def has_key(settings: object, keys: list) -> bool:
    """Whether nested mapping ``settings`` sets the key path ``keys``."""
    for key in keys:
        if not isinstance(settings, dict) or key not in settings:
            return False
        settings = settings[key]
    return True


def setting_origin(keys: list, user: Sources, preset: str, preset_files: Sources) -> str:
    """Which source set config key path ``keys``: the ``user``'s last that does, else the
    preset's file that does."""
    keys = [k for k in keys if not isinstance(k, int)]
    for label, settings in reversed(user):
        if has_key(settings, keys):
            return label
    for name, settings in reversed(preset_files):
        if has_key(settings, keys):
            return f"preset {preset}, {name}"
    return f"preset {preset}"


# ------------------------------------------------------------------ schema problems, one line each
def key_path(keys: list) -> str:
    """``training.epochs``, ``configurations[0]``: a config key path as the user writes it."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text or "the config"


def short(value: object, width: int = 60) -> str:
    """A value as YAML would show it (strings quoted), cut to ``width`` characters."""
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def resolve_ref(schema: dict, root: dict) -> dict:
    """``schema`` with its ``$ref`` (a ``#/...`` pointer into the ``root`` schema) followed."""
    while "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def bounds(schema: dict) -> str:
    """' >= 0', ' in (0, 1]' ...: a number's limits in ``schema``."""
    lo = ("[", schema["minimum"]) if "minimum" in schema else None
    lo = ("(", schema["exclusiveMinimum"]) if "exclusiveMinimum" in schema else lo
    hi = ("]", schema["maximum"]) if "maximum" in schema else None
    hi = (")", schema["exclusiveMaximum"]) if "exclusiveMaximum" in schema else hi
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return ""


def expected(schema: dict, root: dict) -> str:
    """What ``schema`` accepts, in a few words ("an integer >= 2", "one of demo, paper"), so a
    wrong value is answered with its fix rather than with the schema itself."""
    schema = resolve_ref(schema, root)
    if schema.get("oneOf") or schema.get("anyOf"):
        return " or ".join(expected(s, root) for s in schema.get("oneOf") or schema["anyOf"])
    if "enum" in schema:
        values = [short(v) if isinstance(v, str) else json.dumps(v) for v in schema["enum"]]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    types = schema.get("type") or []
    words = []
    for kind in [types] if isinstance(types, str) else types:
        if kind in ("integer", "number"):
            words.append(("an integer" if kind == "integer" else "a number") + bounds(schema))
        elif kind == "array":
            lo, hi = schema.get("minItems"), schema.get("maxItems")
            count = f"{lo}" if lo == hi and lo else (f"{lo} or more" if lo else "")
            unique = " different" if schema.get("uniqueItems") else ""
            items = expected(schema["items"], root) if "items" in schema else ""
            words.append(
                f"a list of {count}{unique} items".replace("  ", " ")
                + (f" (each {items})" if items else "")
            )
        elif kind == "object":
            keys = ", ".join(schema.get("properties", {}))
            words.append(f"a mapping (keys: {keys})" if keys else "a mapping")
        elif kind == "string":
            pattern = schema.get("pattern")
            words.append("a string" + (f" matching {pattern}" if pattern else ""))
        else:
            words.append({"boolean": "true or false", "null": "null"}.get(kind, kind))
    return " or ".join(words) or "another value"


def schema_keys(schema: dict, root: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path the schema allows, for a misplaced key (``epochs`` at the top level)."""
    schema = resolve_ref(schema, root)
    paths = []
    for branch in [schema, *schema.get("oneOf", [])]:
        for key, sub in resolve_ref(branch, root).get("properties", {}).items():
            paths.append((*prefix, key))
            paths.extend(schema_keys(sub, root, (*prefix, key)))
    return paths


def unknown_key_hint(key: str, allowed: list[str], parent: list, root: dict) -> str:
    """Did you mean ...: the nearest valid key at that level, else a key of that name (or
    nearly) elsewhere in the config, else the valid keys of that level."""
    guess = nearest(key, allowed) or next(
        (k for k in allowed if str(key) in k.split("_") or k in str(key).split("_")),
        None,
    )
    if guess:
        return f"did you mean {guess!r}?"
    elsewhere = [p for p in schema_keys(root, root) if list(p[:-1]) != list(parent)]
    guess = nearest(key, {p[-1] for p in elsewhere})
    if guess:
        places = [key_path(p) for p in elsewhere if p[-1] == guess][:3]
        return "did you mean " + " or ".join(repr(p) for p in places) + "?"
    return f"the keys of {key_path(parent)} are " + ", ".join(allowed)


def value_problem(error: jsonschema.ValidationError, keys: list, root: dict, origin: Origin) -> str:
    """The line for a wrong value: its key path, the value, what is expected (and the nearest
    allowed word for a misspelt one), and where it was set."""
    value = error.instance
    if error.validator == "uniqueItems":
        line = f"{key_path(keys)}: {short(value)} lists an item twice"
    else:
        line = f"{key_path(keys)}: {short(value)} is not valid; expected "
        line += expected(error.schema, root)
    words = [
        v
        for s in [error.schema, *error.schema.get("oneOf", [])]
        for v in resolve_ref(s, root).get("enum", [])
        if isinstance(v, str)
    ]
    guess = nearest(value, words) if isinstance(value, str) else None
    if guess:
        line += f"; did you mean {guess!r}?"
    elif str(value).lower() in ("true", "false") and "true or false" in line:
        # Snakemake's --config reads only True and False as booleans
        line += f"; write --config {key_path(keys)}={str(value).capitalize()}"
    return f"{line} ({origin(keys)})"


def matching_branch(error: jsonschema.ValidationError) -> list | None:
    """The errors inside the one branch of a oneOf/anyOf that the value's type fits (a mapping
    for ``synthetic: {...}``), which say more than "matches none"; None when not exactly one."""
    branches: dict = {}
    for sub in error.context or []:
        branches.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [
        subs
        for subs in branches.values()
        if not any(s.validator in ("type", "enum", "const") and not s.relative_path for s in subs)
    ]
    return fitting[0] if len(fitting) == 1 else None


def describe_error(error: jsonschema.ValidationError, root: dict, origin: Origin) -> list[str]:
    """The lines of one jsonschema error: an unknown key with the nearest valid one, a missing
    key, or a wrong value with what is expected."""
    keys = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        lines = []
        for key in error.instance:
            if key not in allowed:
                hint = unknown_key_hint(key, allowed, keys, root)
                where = origin([*keys, key])
                lines.append(f"{key_path([*keys, key])}: unknown key; {hint} ({where})")
        return lines
    if error.validator == "required":
        return [
            f"{key_path([*keys, key])}: missing; expected "
            + expected(error.schema.get("properties", {}).get(key, {}), root)
            for key in error.validator_value
            if key not in error.instance
        ]
    branch = error.validator in ("oneOf", "anyOf") and matching_branch(error)
    if branch:
        return [line for sub in branch for line in describe_error(sub, root, origin)]
    return [value_problem(error, keys, root, origin)]


def config_problems(settings: dict, root: dict, origin: Origin) -> list[str]:
    """One line per way ``settings`` breaks the ``root`` schema: the key path, the value, what
    is expected instead and which file or flag set it (``origin``)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(root)(root)
    problems = []
    for error in sorted(validator.iter_errors(settings), key=lambda e: str(list(e.path))):
        problems.extend(describe_error(error, root, origin))
    return list(dict.fromkeys(problems))


def check_settings(settings: dict, root: dict, origin: Origin, name: str, most: int = 6) -> None:
    """Raise a ConfigError listing the first ``most`` problems of ``settings`` (config_problems),
    so that nothing runs; ``name``: the schema's file, where every key is described."""
    problems = config_problems(settings, root, origin)
    if not problems:
        return
    shown = problems[:most]
    if len(problems) > most:
        shown.append(f"... and {len(problems) - most} more")
    raise ConfigError(
        f"{len(problems)} problem{'s' * (len(problems) > 1)} in the config, so nothing "
        f"was run (every key is described in the workflow's {name}):\n  " + "\n  ".join(shown)
    )


# ------------------------------------------------------------------ data_root
def shown_path(path: str | Path, launch_dir: str | None) -> str:
    """``path`` as the user would type it: relative to the launch folder when inside it."""
    path = os.path.abspath(path)
    if launch_dir and path.startswith(os.path.join(launch_dir, "")):
        return os.path.relpath(path, launch_dir)
    return path


def resolve_data_root(path: str, launch_dir: str | None, origin: Origin) -> str:
    """A real data root as an absolute path, a relative one read from the folder snakemake was
    started in (``launch_dir``), as a shell reads it, also with --directory: the README's run
    on scratch storage keeps the data beside the checkout (synthetic data is not resolved)."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        return os.path.normpath(path)
    if launch_dir is None:
        raise ConfigError(
            f"data_root: {path!r} ({origin(['data_root'])}) is relative, and the folder "
            "snakemake was started in is unknown (--directory moved away from it): give data_root "
            "as an absolute path"
        )
    return os.path.normpath(os.path.join(launch_dir, path))


def missing_data_root(
    root: str, settings: Mapping, dataset: str, fetch: bool, launch_dir: str | None, origin: Origin
) -> str:
    """The message for a data_root ``root`` (resolved from ``settings``' data_root) that is not a
    folder: which file or flag set it, the folder it was resolved to, and the commands (README:
    The data) that put ``dataset`` there (``fetch``: the workflow downloads the imaging)."""
    given, preset = settings["data_root"], settings["preset"]
    lines = [f"data_root: {root!r} is missing or not a folder."]
    how = f"It is data_root: {given} from {origin(['data_root'])}"
    if not os.path.isabs(os.path.expanduser(given)):
        how += f", relative to the folder snakemake was started in ({launch_dir})"
    lines.append(f"{how}.")
    repository, inner = KITS_SOURCES[dataset]
    parts, tail = Path(root).parts, Path(inner).parts
    clone = str(Path(*parts[: -len(tail)])) if parts[-len(tail) :] == tail else None
    download = "(the workflow downloads the imaging: fetch_imaging: true)"
    fetch_text = download if fetch else f"&& kitsnet fetch {dataset} --out "
    if clone and os.path.dirname(clone) == launch_dir and os.path.basename(clone) == dataset:
        out = "" if fetch else os.path.relpath(root, launch_dir)
        lines.append(
            f"To get {dataset} there, in {launch_dir}: git clone {repository} {fetch_text}{out}"
        )
    elif clone:
        out = "" if fetch else root
        lines.append(f"To get {dataset} there: git clone {repository} {clone} {fetch_text}{out}")
    else:
        out = "" if fetch else f"DIR/{inner}"
        lines.append(
            f"To get {dataset}: git clone {repository} DIR {fetch_text}{out}, "
            f"then data_root: DIR/{inner}"
        )
    lines.append(
        f"Data elsewhere: data_root: /path/to/{inner} in your --configfile, or "
        f"--config preset={preset} data_root=/path/to/{inner}"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------ resources
def fit_resources(settings: dict, limits: Mapping[str, object]) -> None:
    """Fit the per-job requests of ``settings`` (its ``resources``), in place, to the run's own
    ``limits`` (--resources: the workstation profile's gpu=1 and mem_mb=<the machine's RAM>).
    Snakemake refuses a job that asks for more than the run has only when the job becomes ready,
    hours into a run.  So a mem_mb request above the limit (the paper's are sized for SLURM
    nodes: 64000 for a fullres training) is lowered to it, growth on retries included, and that
    job runs with the machine to itself; a GPU count above the limit is an error now."""
    resources = settings.get("resources") or {}
    steps = ("train", "predict", "preprocess", "evaluate", "fingerprint")
    # (step, configuration or None, its settings) of every request in the config
    requests = [(s, None, resources.get(s) or {}) for s in steps]
    requests += [
        (s, name, spec)
        for s, _, step in list(requests)
        for name, spec in step.items()
        if isinstance(spec, dict)
    ]
    memory = limits.get("mem_mb")
    if isinstance(memory, int):
        for step, name, spec in requests:
            # (the rules' own defaults, used without a mem_mb here, are at most 8000)
            if spec.get("mem_mb", 8000 if name is None else 0) > memory:
                spec["mem_mb"] = memory
            if name is None:
                resources[step] = spec
        resources["max_mem_mb"] = min(resources.get("max_mem_mb") or memory, memory)
    gpus = limits.get("gpu")
    if isinstance(gpus, int):
        for step, name, spec in requests:
            default = 1 if step in ("train", "predict") and name is None else 0
            wanted = spec.get("gpu", default)
            if wanted > gpus:
                key = ".".join(k for k in ("resources", step, name, "gpu") if k)
                raise ConfigError(
                    f"{key}: {wanted} GPU(s) per job, but this run has gpu={gpus} "
                    "(--resources, or the profile's resources: gpu=N): lower one of them"
                )
    settings["resources"] = resources
