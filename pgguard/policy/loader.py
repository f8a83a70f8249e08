"""Load, merge and check policy files (``policies/*.yaml``, SPEC §3).

``load_policy(patterns)`` reads every file the glob patterns match (sorted by path), validates
each, and merges them: rules, masks and limits are concatenated in file order; at most one file
may set ``defaults``. Every problem in every file is collected and reported at once, each with
its file, line, rule and field (``PolicyError.problems``). ``check_policy_files`` does the same
without raising, for ``pgguard policy check``. Warnings (rules that can never match, rules that
never decide, odd mask patterns, …) land in ``Policy.warnings``.
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pgguard.policy.engine import SEVERITY, compile_policy
from pgguard.policy.model import (
    COMMAND_ALIASES,
    COMMAND_CLASSES,
    COMMAND_TAGS,
    WITHOUT_WHERE_TAGS,
    Defaults,
    GlobSet,
    LimitRule,
    MaskRule,
    Policy,
    PolicyDocument,
    PolicyError,
    PolicyProblem,
    Rule,
    command_suggestion,
    pattern_shape_problem,
    qualify_pattern,
)

__all__ = [
    "CheckResult",
    "PolicyError",
    "PolicyProblem",
    "check_policy",
    "check_policy_files",
    "load_policy",
    "parse_policy",
]

# --------------------------------------------------------------------------------------------
# YAML with line numbers and duplicate-key detection


class _Loader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _node_at(root: Node | None, path: Sequence[str | int]) -> Node | None:
    """The deepest YAML node along ``path`` (a pydantic error location)."""
    node = root
    for part in path:
        nxt: Node | None = None
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.value == str(part):
                    nxt = value
                    break
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node = nxt
    return node


def _line(root: Node | None, path: Sequence[str | int]) -> int | None:
    node = _node_at(root, path)
    return None if node is None else node.start_mark.line + 1


# --------------------------------------------------------------------------------------------
# One file


@dataclass
class _File:
    name: str  # as reported (the path as found)
    data: Any = None
    root: Node | None = None
    document: PolicyDocument | None = None
    problems: list[PolicyProblem] = field(default_factory=list)


def _label(data: Any, section: str, index: int) -> str:
    """``rules[2](no-secrets)`` / ``masks[0](public.customers.email)`` / ``limits[1]``."""
    label = f"{section}[{index}]"
    try:
        item = data[section][index]
    except (KeyError, IndexError, TypeError):
        return label
    key = {"rules": "name", "masks": "column"}.get(section)
    if key and isinstance(item, dict) and isinstance(item.get(key), str):
        label += f"({item[key]})"
    return label


def _location(data: Any, loc: Sequence[str | int]) -> str:
    if not loc:
        return ""
    if len(loc) >= 2 and isinstance(loc[0], str) and isinstance(loc[1], int):
        out = _label(data, loc[0], loc[1])
        rest = loc[2:]
    else:
        out, rest = "", loc
    for part in rest:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _find_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(path: Sequence[str | int]) -> list[str]:
    model: type[BaseModel] | None = PolicyDocument
    for part in path:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return []
        model = _find_model(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _error_message(err: Any, loc: Sequence[str | int]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"unknown key {loc[-1]!r}{hint}" if loc else f"unknown key{hint}"
    message = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    value = err.get("input")
    if kind != "value_error" and isinstance(value, str | int | float | bool | type(None)):
        message += f" (got {value!r})"
    return message


def _read_file(name: str, text: str) -> _File:
    f = _File(name=name)
    loader = _Loader(text)
    try:
        f.root = loader.get_single_node()
        f.data = None if f.root is None else loader.construct_document(f.root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        where = "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"
        what = "; ".join(p for p in (exc.problem, exc.context) if p)
        f.problems.append(PolicyProblem(name, "", f"YAML syntax error{where}: {what}", line))
        return f
    except yaml.YAMLError as exc:
        f.problems.append(PolicyProblem(name, "", f"YAML error: {exc}"))
        return f
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        f.problems.append(
            PolicyProblem(name, "", f"duplicate key {key!r} (YAML would keep only the last)", line)
        )
    if f.data is None:
        f.problems.append(PolicyProblem(name, "", "empty policy file (expected 'version: 1')"))
        return f
    if not isinstance(f.data, dict):
        f.problems.append(
            PolicyProblem(
                name,
                "",
                "a policy file must be a mapping (version, rules, masks, defaults, limits), "
                f"not a {type(f.data).__name__}",
                _line(f.root, ()),
            )
        )
        return f
    try:
        document = PolicyDocument.model_validate(f.data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, int | str))
            f.problems.append(
                PolicyProblem(
                    name, _location(f.data, loc), _error_message(err, loc), _line(f.root, loc)
                )
            )
        return f
    if not f.problems:
        f.document = document
    return f


# --------------------------------------------------------------------------------------------
# Warnings


@dataclass(frozen=True)
class _Origin:
    file: str
    section: str
    index: int  # within its file
    root: Node | None = None
    label: str = ""

    def problem(self, sub: Sequence[str | int], message: str) -> PolicyProblem:
        location = self.label or f"{self.section}[{self.index}]"
        for part in sub:
            location += f"[{part}]" if isinstance(part, int) else f".{part}"
        line = _line(self.root, (self.section, self.index, *sub))
        return PolicyProblem(self.file, location, message, line, "warning")


_NEVER = "the rule can never match"


def _rule_never_matches(rule: Rule, origin: _Origin, out: list[PolicyProblem]) -> bool:
    """Append the per-rule warnings; True when the rule can never match."""
    never = False
    for key in ("users", "groups", "databases", "agents"):
        if getattr(rule.when, key) == ():
            out.append(origin.problem(("when", key), f"empty list: {_NEVER}"))
            never = True
    match = rule.match
    for key in ("classes", "commands", "tables", "functions"):
        if getattr(match, key) == ():
            out.append(origin.problem(("match", key), f"empty list: {_NEVER}"))
            never = True
    if match.commands:
        usable = 0
        for i, command in enumerate(match.commands):
            tag = COMMAND_ALIASES.get(command, command)
            if tag not in COMMAND_TAGS:
                close = command_suggestion(command)
                hint = f" (did you mean {close}?)" if close else ""
                out.append(
                    origin.problem(
                        ("match", "commands", i),
                        f"{command!r} is not a PostgreSQL command tag{hint}: it never matches",
                    )
                )
            # COMMAND_CLASSES counts the classes of statements that can run ``tag`` inside them
            elif match.classes and COMMAND_CLASSES[tag].isdisjoint(match.classes):
                out.append(
                    origin.problem(
                        ("match", "commands", i),
                        f"a {command} statement is never of class "
                        f"{' or '.join(match.classes)}: this entry never matches",
                    )
                )
            else:
                usable += 1
        if not usable:
            out.append(origin.problem(("match", "commands"), f"no usable command: {_NEVER}"))
            never = True
        elif match.without_where is True and WITHOUT_WHERE_TAGS.isdisjoint(
            _commands(match.commands)
        ):
            out.append(
                origin.problem(
                    ("match", "without_where"),
                    "without_where only applies to UPDATE and DELETE (and TRUNCATE), alone or "
                    f"run inside another statement, and none of these commands runs one: {_NEVER}",
                )
            )
            never = True
    for key in ("tables", "functions"):
        patterns: tuple[str, ...] | None = getattr(match, key)
        if not patterns:
            continue
        bad = 0
        for i, pattern in enumerate(patterns):
            shape = pattern_shape_problem(pattern, "relation")
            if shape is not None:
                out.append(
                    origin.problem(("match", key, i), f"{shape}: this pattern never matches")
                )
                bad += 1
        if bad == len(patterns):
            never = True
    return never


def _glob_covers(outer: tuple[str, ...] | None, inner: tuple[str, ...] | None, kind: Any) -> bool:
    if outer is None:
        return True
    if inner is None:
        return False
    globs = GlobSet(outer, kind)
    return all(globs.covers(p) for p in inner)


def _commands(commands: tuple[str, ...]) -> set[str]:
    return {COMMAND_ALIASES.get(c, c) for c in commands}


def _covers(outer: Rule, inner: Rule) -> bool:
    """True when every statement ``inner`` matches, ``outer`` matches too (conservative)."""
    for key in ("users", "groups", "databases", "agents"):
        if not _glob_covers(getattr(outer.when, key), getattr(inner.when, key), "name"):
            return False
    om, im = outer.match, inner.match
    if om.classes is not None and (im.classes is None or not set(im.classes) <= set(om.classes)):
        return False
    if om.commands is not None and (
        im.commands is None or not _commands(im.commands) <= _commands(om.commands)
    ):
        return False
    if not _glob_covers(om.tables, im.tables, "relation"):
        return False
    if not _glob_covers(om.functions, im.functions, "relation"):
        return False
    return om.without_where is None or om.without_where == im.without_where


def _warnings(
    rules: Sequence[tuple[Rule, _Origin]],
    masks: Sequence[tuple[MaskRule, _Origin]],
    limits: Sequence[tuple[LimitRule, _Origin]],
) -> list[PolicyProblem]:
    out: list[PolicyProblem] = []
    never: list[bool] = [_rule_never_matches(rule, origin, out) for rule, origin in rules]

    # Rules that can match but never decide: a stronger rule matches everything they match.
    for i, (rule, origin) in enumerate(rules):
        if never[i] or rule.action == "audit_only":
            continue
        for j, (other, other_origin) in enumerate(rules):
            if j == i or never[j] or other.action == "audit_only":
                continue
            stronger = SEVERITY[other.action] > SEVERITY[rule.action]
            earlier_same = (
                j < i
                and other.action == rule.action
                and rule.action in ("deny", "require_approval")
            )
            if (stronger or earlier_same) and _covers(other, rule):
                where = f"{other_origin.file}:{other_origin.label or other.name}"
                out.append(
                    origin.problem(
                        (),
                        f"never decides: rule {other.name!r} ({other.action}, {where}) matches "
                        "every statement this rule matches",
                    )
                )
                break

    seen: dict[str, _Origin] = {}
    for mask, origin in masks:
        shape = pattern_shape_problem(mask.column, "column")
        if shape is not None:
            out.append(origin.problem(("column",), f"{shape}: this mask never applies"))
            continue
        qualified = qualify_pattern(mask.column, "column")
        if qualified != mask.column:
            out.append(
                origin.problem(
                    ("column",),
                    f"{mask.column!r} is not schema.table.column: it is read as {qualified!r}",
                )
            )
        first = seen.get(qualified)
        if first is not None:
            out.append(
                origin.problem(
                    ("column",),
                    f"another mask for the same column at {first.file}:{first.label}; for each "
                    "identity the first mask it is not exempt from applies",
                )
            )
        else:
            seen[qualified] = origin

    for limit, origin in limits:
        for key in ("users", "groups", "databases", "agents"):
            if getattr(limit.when, key) == ():
                out.append(origin.problem(("when", key), "empty list: this limit never applies"))
        if not limit.sets_anything:
            out.append(
                origin.problem((), "sets no limit (max_rows, statement_timeout or read_only)")
            )
        elif "on_max_rows" in limit.model_fields_set and limit.max_rows is None:
            out.append(origin.problem(("on_max_rows",), "has no effect without max_rows"))
    return out


def check_policy(policy: Policy) -> tuple[PolicyProblem, ...]:
    """Warnings about a policy built in code (a loaded policy has them in ``warnings``)."""
    file = ", ".join(policy.sources) or "<policy>"

    def origin(section: str, index: int, label: str) -> _Origin:
        return _Origin(file, section, index, None, label)

    return tuple(
        _warnings(
            [(r, origin("rules", i, f"rules[{i}]({r.name})")) for i, r in enumerate(policy.rules)],
            [
                (m, origin("masks", i, f"masks[{i}]({m.column})"))
                for i, m in enumerate(policy.masks)
            ],
            [(lim, origin("limits", i, f"limits[{i}]")) for i, lim in enumerate(policy.limits)],
        )
    )


# --------------------------------------------------------------------------------------------
# Many files


@dataclass(frozen=True)
class CheckResult:
    """The outcome of checking policy files: the merged policy when there is no error."""

    policy: Policy | None
    errors: tuple[PolicyProblem, ...]
    warnings: tuple[PolicyProblem, ...]
    files: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    def report(self) -> str:
        """Human-readable text for ``pgguard policy check``: one line per problem and a summary."""
        lines = [f"error: {p}" for p in self.errors]
        lines += [f"warning: {p}" for p in self.warnings]
        count = len(self.files)
        files = f"{count} file{'s' if count != 1 else ''}"
        if self.errors:
            lines.append(
                f"policy invalid: {len(self.errors)} error(s), {len(self.warnings)} warning(s) "
                f"in {files}"
            )
        else:
            policy = self.policy
            assert policy is not None
            lines.append(
                f"policy OK: {files}, {len(policy.rules)} rule(s), {len(policy.masks)} mask(s), "
                f"{len(policy.limits)} limit(s), default {policy.defaults.action}, "
                f"{len(self.warnings)} warning(s)"
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """For ``pgguard policy check --json``."""
        return {
            "ok": self.ok,
            "files": list(self.files),
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
        }


def _resolve(
    patterns: Sequence[str], base_dir: Path | None
) -> tuple[list[tuple[str, str]], list[PolicyProblem]]:
    """(name to report, path to read) of every file, sorted by path; and missing files. Files
    found through a relative pattern are reported relative to ``base_dir``."""
    base = Path.cwd() if base_dir is None else Path(base_dir)
    found: dict[str, str] = {}
    problems: list[PolicyProblem] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        relative = not os.path.isabs(expanded)
        full = str(base / expanded) if relative else expanded
        if globlib.has_magic(expanded):
            matches = globlib.glob(full, recursive=True)
        elif os.path.isdir(full):
            matches = [m for s in ("*.yaml", "*.yml") for m in globlib.glob(os.path.join(full, s))]
        elif os.path.isfile(full):
            matches = [full]
        else:
            problems.append(PolicyProblem(pattern, "", "no such policy file"))
            continue
        for match in matches:
            path = os.path.normpath(match)
            if os.path.isfile(path) and path not in found:
                found[path] = os.path.relpath(path, base) if relative else path
    return [(found[path], path) for path in sorted(found)], problems


def _check_sources(
    sources: Sequence[tuple[str, str | None, str]], no_files_warning: PolicyProblem | None
) -> CheckResult:
    """``sources``: (name, text or None when unreadable, read error message)."""
    files: list[_File] = []
    errors: list[PolicyProblem] = []
    for name, text, read_error in sources:
        if text is None:
            errors.append(PolicyProblem(name, "", read_error))
            continue
        f = _read_file(name, text)
        files.append(f)
        errors.extend(f.problems)

    # Across files, from the raw data so that broken files take part too.
    names: dict[str, tuple[str, str, int | None]] = {}
    defaults_file: str | None = None
    for f in files:
        if not isinstance(f.data, dict):
            continue
        if "defaults" in f.data:
            if defaults_file is not None:
                errors.append(
                    PolicyProblem(
                        f.name,
                        "defaults",
                        f"defaults are already set in {defaults_file}: at most one file may "
                        "set them",
                        _line(f.root, ("defaults",)),
                    )
                )
            else:
                defaults_file = f.name
        rules = f.data.get("rules")
        if not isinstance(rules, list):
            continue
        for i, item in enumerate(rules):
            if not (isinstance(item, dict) and isinstance(item.get("name"), str)):
                continue
            line = _line(f.root, ("rules", i, "name"))
            label = _label(f.data, "rules", i)
            first = names.get(item["name"])
            if first is not None:
                first_where = f"{first[0]}:{first[2]}" if first[2] else first[0]
                errors.append(
                    PolicyProblem(
                        f.name,
                        f"{label}.name",
                        f"duplicate rule name {item['name']!r} (first defined at {first_where} "
                        f"{first[1]}): rule names must be unique across all policy files",
                        line,
                    )
                )
            else:
                names[item["name"]] = (f.name, label, line)

    order = {name: i for i, (name, _, _) in enumerate(sources)}
    errors.sort(key=lambda p: (order.get(p.file, -1), p.line or 0))
    good = [f for f in files if f.document is not None]
    rules_o: list[tuple[Rule, _Origin]] = []
    masks_o: list[tuple[MaskRule, _Origin]] = []
    limits_o: list[tuple[LimitRule, _Origin]] = []
    defaults = Defaults()
    for f in good:
        doc = f.document
        assert doc is not None
        for i, rule in enumerate(doc.rules):
            rules_o.append((rule, _Origin(f.name, "rules", i, f.root, _label(f.data, "rules", i))))
        for i, mask in enumerate(doc.masks):
            masks_o.append((mask, _Origin(f.name, "masks", i, f.root, _label(f.data, "masks", i))))
        for i, limit in enumerate(doc.limits):
            limits_o.append((limit, _Origin(f.name, "limits", i, f.root, f"limits[{i}]")))
        if doc.defaults is not None:
            defaults = doc.defaults
    warnings = [] if no_files_warning is None else [no_files_warning]
    warnings.extend(_warnings(rules_o, masks_o, limits_o))

    policy: Policy | None = None
    if not errors:
        policy = Policy(
            rules=tuple(r for r, _ in rules_o),
            masks=tuple(m for m, _ in masks_o),
            limits=tuple(lim for lim, _ in limits_o),
            defaults=defaults,
            sources=tuple(name for name, _, _ in sources),
            warnings=tuple(warnings),
        )
        compile_policy(policy)
    return CheckResult(
        policy=policy,
        errors=tuple(errors),
        warnings=tuple(warnings),
        files=tuple(name for name, _, _ in sources),
    )


def _read_all(paths: Iterable[tuple[str, str]]) -> list[tuple[str, str | None, str]]:
    out: list[tuple[str, str | None, str]] = []
    for name, path in paths:
        try:
            out.append((name, Path(path).read_text(encoding="utf-8"), ""))
        except UnicodeDecodeError as exc:
            out.append((name, None, f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        except OSError as exc:
            out.append((name, None, f"cannot read: {exc.strerror or exc}"))
    return out


def check_policy_files(patterns: Sequence[str], base_dir: Path | None = None) -> CheckResult:
    """Check every file the glob ``patterns`` match (relative to ``base_dir``, default the
    working directory); never raises ``PolicyError``. A pattern with no glob characters names a
    file (or a directory of ``*.yaml``/``*.yml``) that must exist; globs that match nothing give
    a policy with no rules and ``defaults.action: allow``, and a warning."""
    paths, missing = _resolve(patterns, base_dir)
    no_files: PolicyProblem | None = None
    if not paths and not missing:
        no_files = PolicyProblem(
            ", ".join(patterns) or "(no patterns)",
            "",
            "no policy file matches: no rules, every statement is allowed",
            severity="warning",
        )
    result = _check_sources(_read_all(paths), no_files)
    if missing:
        return CheckResult(
            policy=None,
            errors=(*missing, *result.errors),
            warnings=result.warnings,
            files=result.files,
        )
    return result


def load_policy(patterns: Sequence[str], base_dir: Path | None = None) -> Policy:
    """Load and merge the policy files; raise ``PolicyError`` listing every problem."""
    result = check_policy_files(patterns, base_dir)
    if result.policy is None:
        raise PolicyError(result.errors, result.warnings)
    return result.policy


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """One policy document from a string (tests, ``explain`` with an inline policy)."""
    result = _check_sources([(source, text, "")], None)
    if result.policy is None:
        raise PolicyError(result.errors, result.warnings)
    return result.policy
