"""The plugin runs on PRISTINE openrlhf 0.11.2: the CPU patch is a device shim, not an API.

Users run stock OpenRLHF on GPU clusters; CI only has the venv made by scripts/setup_cpu.sh,
whose openrlhf carries patches/openrlhf-0.11.2-cpu.patch. So the pristine package is rebuilt
offline: the installed package is copied to a temp dir and the applied patch is reversed there.
The copy is checked file by file against the wheel's own RECORD hashes (kept in the dist-info),
so it is byte for byte what `pip install openrlhf==0.11.2` ships. A second copy gets the
repository's patch applied.

One child process (this file run as a script, pristine copy first on sys.path, no Ray) then:
  (a) takes every function and method the patch touches (derived from the patch hunks mapped
      onto the AST of the pristine and patched sources) and compares `inspect.signature` in
      the pristine and the patched package;
  (b) binds every call the plugin makes into upstream to the PRISTINE signature, with the
      arguments built by the plugin's own builders (host/launch.py, host/teachers/scoring.py,
      host/actor.py) from each TSD-KD recipe's flags parsed by the real parser: engine creation,
      actor groups, the trainer (and its super().__init__ into PPOTrainer), the strategy, the
      teacher's `Actor`, the `ActorPPOTrainer(...)` call of upstream's
      `init_model_from_pretrained` through the trainer-class swap, and every super() call of the
      plugin's subclasses; every upstream method the plugin overrides must keep a signature
      that accepts every call the pristine one accepts;
  (c) imports all of tsdkd_plugin.host and tsdkd_plugin.cli against the pristine package;
and every recipe (TSD-KD, GRPO, DPO) parses with the pristine parsers (no `fp32`, which only the
patch adds). Separately, nothing in tsdkd_plugin names a function, method, attribute or module
that only the patch adds.
"""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "openrlhf-0.11.2-cpu.patch"
APPLIED_COPY_NAME = "TSDKD_CPU_PATCH"  # scripts/apply_patches.sh keeps the applied patch here
DIST_INFO = "openrlhf-0.11.2.dist-info"
CHILD_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- the patch, read as data


def parse_patch(text: str) -> dict[str, dict]:
    """{path inside site-packages: {"old": changed old line numbers, "new": changed new line
    numbers, "created": bool}} for a `diff -ruN a b` patch (paths stripped of a/ and b/)."""
    files: dict[str, dict] = {}
    current = None
    old_line = new_line = 0
    for line in text.splitlines():
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].split("/", 1)[1]
            current = files.setdefault(path, {"old": set(), "new": set(), "created": False})
            continue
        if line.startswith("--- ") or line.startswith("diff "):
            continue
        match = re.match(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,\d+)? @@", line)
        if match:
            old_line, new_line = int(match.group(1)), int(match.group(3))
            if old_line == 0 and match.group(2) == "0":
                current["created"] = True
            continue
        if current is None or not line or line.startswith("\\"):
            continue
        if line[0] == " ":
            old_line, new_line = old_line + 1, new_line + 1
        elif line[0] == "-":
            current["old"].add(old_line)
            old_line += 1
        elif line[0] == "+":
            current["new"].add(new_line)
            new_line += 1
    return files


def top_level_defs(source: str) -> list[tuple[str, int, int]]:
    """(qualname, first line incl. decorators, last line) of module-level functions and of the
    methods of module-level classes: what `inspect.signature` can be asked about."""
    defs = []
    function_types = (ast.FunctionDef, ast.AsyncFunctionDef)

    def span(node):
        return min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno

    for node in ast.parse(source).body:
        if isinstance(node, function_types):
            defs.append((node.name, *span(node)))
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, function_types):
                    defs.append((f"{node.name}.{item.name}", *span(item)))
    return defs


def defs_containing(source: str, lines: set[int]) -> set[str]:
    return {name for name, first, last in top_level_defs(source) if any(first <= n <= last for n in lines)}


def module_name(path: str) -> str:
    return path[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def touched_functions(patch_text: str, pristine_site: Path, patched_site: Path) -> dict[str, dict[str, list[str]]]:
    """{module: {"touched": qualnames in both trees, "added": only in the patched tree,
    "removed": only in the pristine tree}} for every .py file the patch changes."""
    result = {}
    for path, change in parse_patch(patch_text).items():
        if not path.endswith(".py"):
            continue
        old_source = "" if change["created"] else (pristine_site / path).read_text()
        new_source = (patched_site / path).read_text()
        old_names = {name for name, _, _ in top_level_defs(old_source)}
        new_names = {name for name, _, _ in top_level_defs(new_source)}
        changed = defs_containing(old_source, change["old"]) | defs_containing(new_source, change["new"])
        result[module_name(path)] = {
            "touched": sorted(changed & old_names & new_names),
            "added": sorted((changed & new_names) - old_names),
            "removed": sorted((changed & old_names) - new_names),
        }
    return result


def attributes_assigned_on_self(source: str) -> set[str]:
    return {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    }


def what_only_the_patch_adds(
    patch_text: str, pristine_site: Path, patched_site: Path
) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """({module: what}, {member name: (module, what)}): modules the patch creates, and the
    functions, methods and `self.` attributes it adds to existing upstream modules."""
    modules: dict[str, str] = {}
    members: dict[str, tuple[str, str]] = {}
    touched = touched_functions(patch_text, pristine_site, patched_site)
    for path, change in parse_patch(patch_text).items():
        if not path.endswith(".py"):
            continue
        module = module_name(path)
        if change["created"]:
            modules[module] = f"module created by the patch ({path})"
            continue
        old_identifiers = set(re.findall(r"\w+", (pristine_site / path).read_text()))
        for qualname in touched[module]["added"]:
            members.setdefault(qualname.split(".")[-1], (module, f"{module}.{qualname}, added by the patch"))
        for attribute in attributes_assigned_on_self((patched_site / path).read_text()) - old_identifiers:
            members.setdefault(attribute, (module, f"self.{attribute}, set only by the patch in {module}"))
    return modules, members


def uses_of(tree: ast.AST, modules: dict[str, str], members: dict[str, tuple[str, str]]) -> list[tuple[int, str]]:
    """(line, what) for each import of an added module or member, and each `x.<added member>`."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            uses += [(node.lineno, modules[a.name]) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in modules:
                uses.append((node.lineno, modules[node.module]))
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules:
                    uses.append((node.lineno, modules[f"{node.module}.{alias.name}"]))
                elif alias.name in members and members[alias.name][0] == node.module:
                    uses.append((node.lineno, members[alias.name][1]))
        elif isinstance(node, ast.Attribute) and node.attr in members:
            uses.append((node.lineno, members[node.attr][1]))
    return uses


def created_files(patch_text: str) -> list[str]:
    return sorted(path for path, change in parse_patch(patch_text).items() if change["created"])


# ----------------------------------------------------------------------------- pristine and patched copies


def run_patch(site: Path, patch_file: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = ["patch", "-p1", "-d", str(site), "-f", "-E", "--fuzz=0", "--no-backup-if-mismatch",
           "--reject-file=-", "-s", *flags]  # fmt: skip
    with open(patch_file, "rb") as stdin:
        return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=60)


def installed_site() -> Path:
    """The site-packages dir holding the installed openrlhf (found without importing it)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or spec.origin is None:
        pytest.skip("openrlhf is not installed")
    return Path(spec.origin).parent.parent


def wheel_record(dist_info: Path) -> dict[str, str]:
    """{path: sha256 (urlsafe base64, as in wheels)} of the wheel's openrlhf files, from RECORD."""
    record = {}
    with open(dist_info / "RECORD", newline="") as handle:
        for row in csv.reader(handle):
            if len(row) >= 2 and row[0].startswith("openrlhf/") and row[1].startswith("sha256="):
                record[row[0]] = row[1][len("sha256="):]
    return record


def sha256_b64(path: Path) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()


def copy_package(source_site: Path, dest_site: Path) -> None:
    dest_site.mkdir(parents=True)
    shutil.copytree(source_site / "openrlhf", dest_site / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """{"pristine": site dir with openrlhf 0.11.2 as the wheel ships it, "patched": the same plus
    this repository's patch}. The pristine tree comes from the installed package with the applied
    patch reversed (the copy scripts/apply_patches.sh recorded in the dist-info, else this one)."""
    site = installed_site()
    dist_info = site / DIST_INFO
    if not dist_info.is_dir():
        pytest.skip(f"the installed openrlhf is not 0.11.2 (no {DIST_INFO} in {site})")
    base = tmp_path_factory.mktemp("stock_contract")
    pristine = base / "pristine"
    copy_package(site, pristine)
    candidates = [PATCH] + ([dist_info / APPLIED_COPY_NAME] if (dist_info / APPLIED_COPY_NAME).is_file() else [])
    for candidate in candidates:
        if run_patch(pristine, candidate, "-R", "--dry-run").returncode == 0:
            reverted = run_patch(pristine, candidate, "-R")
            assert reverted.returncode == 0, reverted.stdout + reverted.stderr
            for path in created_files(candidate.read_text()):
                assert not (pristine / path).exists(), f"reversing {candidate.name} left {path} behind"
            break
    record = wheel_record(dist_info)
    differing = sorted(
        p for p, digest in record.items() if not (pristine / p).is_file() or sha256_b64(pristine / p) != digest
    )
    extra = sorted(
        p.relative_to(pristine).as_posix() for p in (pristine / "openrlhf").rglob("*")
        if p.is_file() and p.relative_to(pristine).as_posix() not in record
    )  # fmt: skip
    assert record and not differing and not extra, (
        f"could not rebuild pristine openrlhf 0.11.2 from the installed package: files differing from the "
        f"wheel's RECORD {differing[:8]}, files the wheel does not have {extra[:8]}; "
        f"reinstall it (pip install --force-reinstall --no-deps openrlhf==0.11.2) and run scripts/apply_patches.sh"
    )
    patched = base / "patched"
    copy_package(pristine, patched)
    applied = run_patch(patched, PATCH)
    assert applied.returncode == 0, f"{PATCH.name} does not apply to pristine 0.11.2: {applied.stdout}{applied.stderr}"
    return {"pristine": pristine, "patched": patched}


@pytest.fixture(scope="module")
def probe(trees, tmp_path_factory) -> dict:
    """Run the checks in one child process against the pristine (then the patched) package."""
    touched = touched_functions(PATCH.read_text(), trees["pristine"], trees["patched"])
    work = tmp_path_factory.mktemp("stock_probe")
    request = {"pristine": str(trees["pristine"]), "patched": str(trees["patched"]), "touched": touched}
    (work / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("OPENRLHF_DEVICE", "PYTHONPATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(trees["pristine"]), str(ROOT)]), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    result = subprocess.run(
        [sys.executable, __file__, str(work / "request.json"), str(work / "result.json")],
        env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=str(work),
    )  # fmt: skip
    assert result.returncode == 0, f"contract probe failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads((work / "result.json").read_text())


# ----------------------------------------------------------------------------- the checks


def test_touched_functions_are_derived_from_the_patch(trees):
    """The derivation itself: known hunks land on the functions they are in."""
    touched = touched_functions(PATCH.read_text(), trees["pristine"], trees["patched"])
    assert "DeepspeedStrategy.setup_distributed" in touched["openrlhf.utils.deepspeed.deepspeed"]["touched"]
    assert "create_vllm_engines" in touched["openrlhf.trainer.ray.vllm_engine"]["touched"]
    assert "ActorPPOTrainer.__init__" in touched["openrlhf.trainer.ray.ppo_actor"]["touched"]
    assert "use_cpu" in touched["openrlhf.utils.device"]["added"]
    assert all(not entry["removed"] for entry in touched.values()), touched


def test_child_imported_the_pristine_and_then_the_patched_package(probe, trees):
    assert probe["openrlhf_file"]["pristine"].startswith(str(trees["pristine"]))
    assert probe["openrlhf_file"]["patched"].startswith(str(trees["patched"]))


def test_patch_changes_no_upstream_signature(probe):
    """(a) every function/method the patch touches keeps its exact pristine signature."""
    pristine, patched = probe["signatures"]["pristine"], probe["signatures"]["patched"]
    assert pristine and set(pristine) == set(patched)
    changed = {name: (pristine[name], patched[name]) for name in pristine if pristine[name] != patched[name]}
    assert not changed, "the CPU patch changes upstream signatures (pristine -> patched): " + "; ".join(
        f"{name}: {old} -> {new}" for name, (old, new) in changed.items()
    )


def test_plugin_calls_bind_to_pristine_signatures(probe):
    """(b) engine creation, actor groups, trainer, strategy, teacher Actor, the swapped
    ActorPPOTrainer and every super() call, with the plugin's own builders, per TSD-KD recipe."""
    assert probe["recipes_bound"], "no TSD-KD recipe was bound"
    assert not probe["bind_errors"], "calls into upstream that pristine openrlhf 0.11.2 rejects:\n" + "\n".join(
        probe["bind_errors"]
    )
    # The chain is complete: each kind of call was bound for at least one recipe.
    assert set(probe["calls_bound"]) >= {
        "get_strategy", "create_vllm_engines", "RayActorGroup(policy)", "RayActorGroup(teacher)",
        "TSDKDTrainer -> PPOTrainer.__init__", "Actor(teacher)", "ActorPPOTrainer(...) via trainer-class swap",
        "TSDKDPolicyActorImpl.init_model_from_pretrained -> super()",
        "TeacherModelActor.init_model_from_pretrained",
    }, probe["calls_bound"]  # fmt: skip


def test_plugin_overrides_stay_compatible_with_pristine(probe):
    assert probe["overrides_checked"], "found no upstream method overridden by the plugin"
    assert not probe["override_errors"], "\n".join(probe["override_errors"])


def test_override_rule_rejects_what_would_break_an_upstream_call():
    import inspect

    def sig(text):
        namespace = {}
        exec(f"def f{text}: pass", namespace)
        return inspect.signature(namespace["f"])

    ok = [("(self, a, b=1)", "(self, a, b=1, extra=None)"), ("(self, *args, **kwargs)", "(self, x, y)"),
          ("(self, a)", "(self, *args, **kwargs)"), ("(self, a, b=1)", "(self, a, b=2)")]  # fmt: skip
    bad = [("(self, a, *, b=1)", "(self, a)", "keyword 'b'"), ("(self, a, b=1)", "(self, a)", "parameter 'b'"),
           ("(self, a)", "(self, x)", "positional parameter 1"), ("(self, a)", "(self, a, extra)", "requires 'extra'"),
           ("(self, a, **kw)", "(self, a)", "**kwargs"),
           ("(self, a, b=1)", "(self, a, b)", "requires 'b'")]  # fmt: skip
    for upstream, override in ok:
        assert _override_problem(sig(upstream), sig(override)) is None, (upstream, override)
    for upstream, override, why in bad:
        assert why in (_override_problem(sig(upstream), sig(override)) or ""), (upstream, override)


def test_plugin_host_modules_import_against_pristine(probe):
    """(c)"""
    assert len(probe["imported"]) >= 10, probe["imported"]
    assert not probe["import_errors"], probe["import_errors"]


def test_recipes_parse_with_the_pristine_parsers(probe):
    assert len(probe["recipes_parsed"]) >= 5, probe["recipes_parsed"]
    assert not probe["recipe_errors"], "\n".join(probe["recipe_errors"])


def test_plugin_uses_nothing_that_only_the_patch_adds(trees):
    modules, members = what_only_the_patch_adds(PATCH.read_text(), trees["pristine"], trees["patched"])
    assert "openrlhf.utils.device" in modules  # the derivation sees the patch's additions
    # The scan finds such uses (so its silence below means something).
    probe = ast.parse("from openrlhf.utils.device import use_cpu\nimport openrlhf.utils.device\n")
    assert len(uses_of(probe, modules, members)) == 2
    found = []
    for path in sorted((ROOT / "tsdkd_plugin").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        found += [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in uses_of(tree, modules, members)]
    assert not found, "plugin code relies on what only the CPU patch provides:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- child process


def _child(request_file: str, result_file: str) -> None:  # noqa: C901 (one linear script)
    import importlib
    import inspect
    import pkgutil
    import traceback

    request = json.loads(Path(request_file).read_text())
    out = {"openrlhf_file": {}, "signatures": {}, "bind_errors": [], "calls_bound": [], "recipes_bound": [],
           "override_errors": [], "overrides_checked": [], "imported": [], "import_errors": {},
           "recipes_parsed": [], "recipe_errors": []}  # fmt: skip

    class Placeholder:
        """Stands for a value the check does not need (a Ray handle, a placement group...)."""

        def __init__(self, text):
            self.text = text

        def __repr__(self):
            return f"<{self.text}>"

    def resolve(qualname: str, module):
        obj = module
        for part in qualname.split("."):
            obj = getattr(obj, part)
            obj = getattr(obj, "__ray_actor_class__", obj)  # @ray.remote classes
        return obj

    def signatures(package: str) -> dict[str, str]:
        found = {}
        for module_name_, entry in request["touched"].items():
            if not entry["touched"]:
                continue
            module = importlib.import_module(module_name_)
            assert module.__file__.startswith(package), (module.__file__, package)
            for qualname in entry["touched"]:
                found[f"{module_name_}.{qualname}"] = str(inspect.signature(resolve(qualname, module)))
        return found

    import openrlhf

    out["openrlhf_file"]["pristine"] = openrlhf.__file__

    # (c) every plugin host / CLI module imports against pristine openrlhf.
    import tsdkd_plugin.cli
    import tsdkd_plugin.host

    for package in (tsdkd_plugin.host, tsdkd_plugin.cli):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                importlib.import_module(info.name)
                out["imported"].append(info.name)
            except Exception:
                out["import_errors"][info.name] = traceback.format_exc(limit=3)[-1500:]

    # (a), pristine half.
    out["signatures"]["pristine"] = signatures(request["pristine"])

    # Recipes: parsed by the pristine parsers (+ our groups for TSD-KD).
    from tsdkd_plugin.recipes_tools import recipe_check

    parsed = []
    for script in recipe_check.recipe_scripts():
        try:
            parsed.append(recipe_check.parse_recipe(script, env=recipe_check.EXAMPLE_ENV))
            out["recipes_parsed"].append(script.name)
        except recipe_check.RecipeError as error:
            out["recipe_errors"].append(str(error))

    # (b) calls into upstream, with the plugin's builders.
    from openrlhf.models import Actor
    from openrlhf.trainer.ppo_trainer import PPOTrainer
    from openrlhf.trainer.ray import launcher as upstream_launcher
    from openrlhf.trainer.ray import ppo_actor as upstream_ppo_actor
    from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
    from openrlhf.utils import get_strategy

    from tsdkd_plugin.host import actor as plugin_actor
    from tsdkd_plugin.host import launch as plugin_launch
    from tsdkd_plugin.host import trainer as plugin_trainer
    from tsdkd_plugin.host.teachers import ray_group as plugin_teacher_group
    from tsdkd_plugin.host.teachers import scoring as plugin_scoring

    SELF = Placeholder("self")

    def bind(label, where, func, *args, **kwargs):
        """Bind to `func`'s signature; record a failure with the call site."""
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except TypeError as error:
            out["bind_errors"].append(f"{where}: {label}: {error} (signature {inspect.signature(func)})")
            return None
        if label not in out["calls_bound"]:
            out["calls_bound"].append(label)
        return bound

    def super_calls(method) -> list[ast.Call]:
        """The `super().<same name>(...)` calls in a plugin method's source."""
        import textwrap

        tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        return [
            node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "super"
        ]  # fmt: skip

    MISSING = object()

    def call_arguments(call: ast.Call, values: dict):
        """(args, kwargs) of an AST call, names resolved from `values` (a bound call of the
        enclosing method) or left as placeholders; MISSING when a *x / **x cannot be resolved."""

        def value(node):
            if isinstance(node, ast.Name) and node.id in values:
                return values[node.id]
            if isinstance(node, ast.Constant):
                return node.value
            return Placeholder(ast.unparse(node))

        args, kwargs = [], {}
        for node in call.args:
            if isinstance(node, ast.Starred):
                starred = values.get(node.value.id, MISSING) if isinstance(node.value, ast.Name) else MISSING
                if starred is MISSING:
                    return MISSING
                args.extend(starred)
            else:
                args.append(value(node))
        for keyword in call.keywords:
            if keyword.arg is None:
                starred = values.get(keyword.value.id, MISSING) if isinstance(keyword.value, ast.Name) else MISSING
                if starred is MISSING:
                    return MISSING
                kwargs.update(starred)
            else:
                kwargs[keyword.arg] = value(keyword.value)
        return args, kwargs

    def upstream_method(cls, name):
        for base in cls.__mro__[1:]:
            if base.__module__.startswith("openrlhf.") and name in vars(base):
                return base, vars(base)[name]
        return None, None

    def bind_super_calls(cls, method_name, bound_values, label=None) -> bool:
        """Bind each super().<method_name>(...) of cls.method_name to the pristine upstream method.
        False when an argument could only be known from a real call (unresolved *args/**kwargs)."""
        base, upstream = upstream_method(cls, method_name)
        if upstream is None:
            return True
        complete = True
        for call in super_calls(vars(cls)[method_name]):
            arguments = call_arguments(call, bound_values)
            if arguments is MISSING:
                complete = False
                continue
            args, kwargs = arguments
            bind(label or f"{cls.__name__}.{method_name} -> super()", f"{cls.__module__}.{cls.__qualname__}",
                 upstream, SELF, *args, **kwargs)  # fmt: skip
        return complete

    def values_of(bound):
        return dict(bound.arguments) if bound is not None else {}

    # The trainer-class swap works only while upstream builds its trainer through the module-global
    # name that host/actor.py replaces.
    pristine_init = upstream_ppo_actor.PolicyModelActor.__ray_actor_class__.init_model_from_pretrained
    import textwrap

    swap_calls = [
        node for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(pristine_init))))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "ActorPPOTrainer"
    ]  # fmt: skip
    if len(swap_calls) != 1 or pristine_init.__globals__ is not vars(plugin_actor.upstream_ppo_actor):
        out["bind_errors"].append(
            "PolicyModelActor.init_model_from_pretrained no longer builds its trainer as one ActorPPOTrainer(...) "
            "call through the ppo_actor module global that host/actor.py swaps"
        )

    covered = set()  # (class, method) whose super() calls were bound from real builder values
    shared_vocab_size = 1000  # placeholder: the recipes name hub models, which are not read here
    for recipe in parsed:
        if recipe.command.module != recipe_check.TSDKD_MODULE:
            continue
        args, run, where = recipe.args, recipe.config, recipe.command.script  # config: the typed RunConfig
        out["recipes_bound"].append(Path(where).name)
        bind("get_strategy", where, get_strategy, args)
        strategy = get_strategy(args)
        shared_pg = Placeholder("placement group") if args.train.colocate_all else None
        engines = [Placeholder("vLLM engine")]
        bind("create_vllm_engines", where, create_vllm_engines,
             **plugin_launch.vllm_engine_arguments(args, shared_pg))  # fmt: skip
        bind("RayActorGroup(policy)", where, upstream_launcher.RayActorGroup.__init__, SELF,
             **plugin_launch.policy_group_arguments(args, shared_pg))  # fmt: skip
        teacher_group = None
        if run.teacher.has_own_group:
            bind("RayActorGroup(teacher)", where, upstream_launcher.RayActorGroup.__init__, SELF,
                 **plugin_launch.teacher_group_arguments(run))  # fmt: skip
            teacher_group = Placeholder("teacher group")
        # Trainer: the plugin's constructor, then its super().__init__ into pristine PPOTrainer.
        trainer_cls = plugin_trainer.TSDKDTrainerImpl
        bound = bind("TSDKDTrainer", where, trainer_cls.__init__, SELF, **plugin_launch.trainer_arguments(
            args, run, strategy, Placeholder("policy group"), teacher_group, engines))  # fmt: skip
        if bound is not None and bind_super_calls(trainer_cls, "__init__", values_of(bound),
                                                  "TSDKDTrainer -> PPOTrainer.__init__"):  # fmt: skip
            covered.add((trainer_cls, "__init__"))
        # Policy actors: the plugin's init_model_from_pretrained, then its super() call.
        policy_cls = plugin_actor.TSDKDPolicyActorImpl
        init_kwargs = plugin_launch.policy_init_arguments(args, run, shared_vocab_size, strategy, 10, engines)
        bound = bind("TSDKDPolicyActorImpl.init_model_from_pretrained", where,
                     policy_cls.init_model_from_pretrained, SELF, **init_kwargs)  # fmt: skip
        if bound is not None:
            bind_super_calls(policy_cls, "init_model_from_pretrained", values_of(bound),
                             "TSDKDPolicyActorImpl.init_model_from_pretrained -> super()")  # fmt: skip
        # Upstream's ActorPPOTrainer(...) call, as upstream writes it, into the swapped-in factory
        # and on through TSDKDActorTrainer.__init__'s super().__init__ into pristine ActorPPOTrainer.
        factory = plugin_actor.actor_trainer_factory(init_kwargs["run"], init_kwargs["shared_vocab_size"])
        for call in swap_calls:
            swap_args, swap_kwargs = call_arguments(call, {})
            trainer_class = factory.func
            bound = bind("ActorPPOTrainer(...) via trainer-class swap", where, trainer_class.__init__, SELF,
                         *factory.args, *swap_args, **{**factory.keywords, **swap_kwargs})  # fmt: skip
            if bound is not None and bind_super_calls(trainer_class, "__init__", values_of(bound),
                                                      "ActorPPOTrainer(...) via trainer-class swap"):  # fmt: skip
                covered.add((trainer_class, "__init__"))
        # The teacher: its Actor (separate group or colocated in the policy actor) and its init.
        bind("Actor(teacher)", where, Actor.__init__, SELF, **plugin_scoring.scoring_model_arguments(
            strategy, run.teacher.model_name_or_path, offload=run.teacher.offload))  # fmt: skip
        if teacher_group is not None:
            bind("TeacherModelActor.init_model_from_pretrained", where,
                 plugin_teacher_group.TeacherModelActor.__ray_actor_class__.init_model_from_pretrained, SELF,
                 **plugin_launch.teacher_init_arguments(run, shared_vocab_size, strategy))  # fmt: skip

    # Overrides and super() calls of every plugin class built on an upstream class.
    seen = set()
    for module_name_ in out["imported"]:
        module = sys.modules[module_name_]
        for obj in list(vars(module).values()):
            cls = getattr(obj, "__ray_actor_class__", obj)  # X and ray.remote(X) are one class
            if not inspect.isclass(cls) or cls.__module__ != module_name_ or cls in seen:
                continue
            seen.add(cls)
            if not any(base.__module__.startswith("openrlhf.") for base in cls.__mro__[1:]):
                continue
            for name, member in vars(cls).items():
                if not inspect.isfunction(member):
                    continue
                base, upstream = upstream_method(cls, name)
                if upstream is None:
                    continue
                label = f"{cls.__module__}.{cls.__qualname__}.{name} overrides {base.__module__}.{base.__qualname__}"
                if name != "__init__":  # constructors are checked at their real call sites above
                    out["overrides_checked"].append(label)
                    problem = _override_problem(inspect.signature(upstream), inspect.signature(member))
                    if problem:
                        out["override_errors"].append(f"{label}: {problem}")
                if not bind_super_calls(cls, name, {}) and (cls, name) not in covered:
                    out["bind_errors"].append(f"{label}: its super() call passes *args/**kwargs that no builder "
                                              f"check resolves; bind it from the real call site in this test")  # fmt: skip

    # (a), patched half: the same modules re-imported from the patched copy.
    for name in [m for m in sys.modules if m == "openrlhf" or m.startswith("openrlhf.")]:
        del sys.modules[name]
    sys.path.insert(0, request["patched"])
    importlib.invalidate_caches()
    import openrlhf as patched_openrlhf

    out["openrlhf_file"]["patched"] = patched_openrlhf.__file__
    out["signatures"]["patched"] = signatures(request["patched"])
    Path(result_file).write_text(json.dumps(out))


def _override_problem(upstream, override) -> str | None:
    """Why some call that upstream's signature accepts would fail (or change meaning) on the
    override, or None. An upstream (*args, **kwargs) placeholder accepts any override."""
    P = type(next(iter(upstream.parameters.values())))
    positional_kinds = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    up = list(upstream.parameters.values())
    ov = list(override.parameters.values())
    if all(p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) for p in up[1:]):
        return None
    ov_positional = [p for p in ov if p.kind in positional_kinds]
    ov_keywords = {p.name for p in ov if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    ov_var_positional = any(p.kind == P.VAR_POSITIONAL for p in ov)
    ov_var_keyword = any(p.kind == P.VAR_KEYWORD for p in ov)
    for index, param in enumerate(p for p in up if p.kind in positional_kinds):
        if index < len(ov_positional):
            if ov_positional[index].name != param.name and param.kind == P.POSITIONAL_OR_KEYWORD:
                return f"positional parameter {index} is {ov_positional[index].name!r}, upstream {param.name!r}"
        elif not ov_var_positional:
            return f"upstream's positional parameter {param.name!r} is not accepted"
    for param in up:
        if param.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and param.name not in ov_keywords and not ov_var_keyword:
            return f"upstream's keyword {param.name!r} is not accepted"
        if param.kind == P.VAR_POSITIONAL and not ov_var_positional:
            return "upstream accepts *args, the override does not"
        if param.kind == P.VAR_KEYWORD and not ov_var_keyword:
            return "upstream accepts **kwargs, the override does not"
    for param in ov:
        if param.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) or param.default is not P.empty:
            continue
        upstream_param = upstream.parameters.get(param.name)
        if upstream_param is None or upstream_param.default is not P.empty:
            return f"the override requires {param.name!r}, which upstream callers need not pass"
    return None


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
