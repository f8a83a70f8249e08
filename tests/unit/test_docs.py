"""docs/ stays in step with the code.

Each reference is checked against what it documents, walked from the code itself, so adding a
configuration key, a metric (or a value of a bounded label), a mask function, a statement
class, a policy key, a built-in rule or a CLI command without documenting it fails here:

* docs/configuration.md: every field path of the ``Settings`` model, with its default;
* docs/metrics.md: every registered metric (name, type, labels), every bounded label value,
  every ``/readyz`` check; and no metric that does not exist;
* docs/policy.md: every mask function, pseudo kind, generalize unit, statement class, action,
  policy key and built-in rule name;
* docs/operations.md or README.md: every (visible) ``pgguard`` command;
* links between these pages point at headings that exist.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, cast, get_args, get_origin

import click
import pytest
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from pgguard import metrics
from pgguard.cli import main as cli_main
from pgguard.config import Settings
from pgguard.masking import functions as mask_functions
from pgguard.masking import plan as mask_plan
from pgguard.policy import identity_guard
from pgguard.policy.engine import DEFAULT_RULE
from pgguard.policy.model import (
    GENERALIZE_UNITS,
    MASK_FUNCTIONS,
    PSEUDO_KINDS,
    STATEMENT_CLASSES,
    Action,
    DefaultAction,
    MaskFunction,
    OnMaxRows,
    PolicyDocument,
)
from pgguard.proxy.admin import Readiness

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCES = ("configuration.md", "policy.md", "metrics.md", "operations.md")


def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def code_spans(text: str) -> set[str]:
    """The contents of every inline code span (`…`) of a Markdown text."""
    return {m.group(1).strip() for m in re.finditer(r"`([^`\n]+)`", text)}


def table_rows(text: str, header: str | None = None) -> Iterator[list[str]]:
    """The cells of every Markdown table row (escaped pipes ``\\|`` stay inside a cell); with
    ``header``, only the body rows of tables whose first header cell is ``header``."""
    current: str | None = None  # the first header cell of the table being read
    at_header = True
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            current, at_header = None, True
            continue
        if set(line) <= set("|-: "):
            continue  # the separator line
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if at_header:
            current, at_header = cells[0], False
            continue
        if header is None or current == header:
            yield cells


def first_span(cell: str) -> str | None:
    m = re.search(r"`([^`]+)`", cell)
    return m.group(1) if m else None


# --------------------------------------------------------------------------- configuration


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def settings_fields(
    model: type[BaseModel] = Settings, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo, bool]]:
    """(dotted path, field, is_section) for every field of the configuration model, sections
    first and then their keys, recursively."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _model_of(info.annotation)
        yield path, info, section is not None
        if section is not None:
            yield from settings_fields(section, path + ".")


def test_the_settings_walk_is_realistic() -> None:
    paths = {p for p, _, _ in settings_fields()}
    leaves = {p for p, _, section in settings_fields() if not section}
    # Spot checks that the walk goes into every section and reaches the extras beyond SPEC §9.
    for expected in (
        "listen",
        "listen.port",
        "upstream.sslrootcert",
        "identity.role_map",
        "audit.instance_id",
        "audit.strict_timeout",
        "masking.secret_file",
        "limits.drain_timeout",
        "log.format",
        "policies",
        "workers",
    ):
        assert expected in paths
    assert len(leaves) >= 50, sorted(leaves)


def test_every_configuration_key_is_documented() -> None:
    spans = code_spans(read("configuration.md"))
    missing = [path for path, _, _ in settings_fields() if path not in spans]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def _documented_defaults() -> dict[str, str]:
    """Key → the default cell's code span, from the key tables of configuration.md."""
    found: dict[str, str] = {}
    leaves = {p for p, _, section in settings_fields() if not section}
    for cells in table_rows(read("configuration.md"), "Key"):
        assert len(cells) == 4, f"not a key | type | default | meaning row: {cells}"
        key = first_span(cells[0])
        if key not in leaves:
            continue
        assert key not in found, f"{key} has two rows in docs/configuration.md"
        default = first_span(cells[2])
        assert default is not None, f"{key}: the default cell has no `value`"
        found[key] = default
    return found


def test_documented_defaults_are_the_models() -> None:
    documented = _documented_defaults()
    checked = 0
    for path, info, section in settings_fields():
        if section:
            continue
        assert path in documented, f"{path} has no row (key | type | default | meaning)"
        text = documented[path]
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[annotation, *info.metadata]
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        value = adapter.validate_python(yaml.safe_load(text))
        default = info.get_default(call_default_factory=True)
        assert value == default, f"{path}: documented default {text!r}, the model has {default!r}"
        checked += 1
    assert checked >= 50


def test_documented_environment_overrides_match_the_model() -> None:
    text = read("configuration.md")
    prefix = Settings.model_config.get("env_prefix")
    delimiter = Settings.model_config.get("env_nested_delimiter")
    assert (prefix, delimiter) == ("PGGUARD_", "__")
    spans = code_spans(text)
    assert prefix in spans and delimiter in spans
    assert f"{prefix}LISTEN{delimiter}PORT=6543" in text


# --------------------------------------------------------------------------- metrics


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed name → (type, label names) of every metric pgguard registers."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    m = metrics.Metrics()
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for collector in list(m.registry._collector_to_names):
        for family in cast(Any, collector).describe():
            name = family.name + ("_total" if family.type == "counter" else "")
            labels = tuple(getattr(collector, "_labelnames", ()))
            out[name] = (family.type, labels)
    return out


def test_the_metrics_walk_is_realistic(registered: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    assert set(registered) == {s.name for s in metrics.ALL_METRICS}
    assert len(registered) >= 12
    assert registered["pgguard_statements_total"] == ("counter", ("class", "decision"))


def test_every_metric_is_documented(registered: dict[str, tuple[str, tuple[str, ...]]]) -> None:
    text = read("metrics.md")
    rows = {first_span(cells[0]): cells for cells in table_rows(text, "Metric")}
    for name, (kind, labels) in registered.items():
        assert name in rows, f"docs/metrics.md has no row for {name}"
        cells = rows[name]
        assert cells[1] == kind, f"{name}: documented as {cells[1]}, registered as {kind}"
        documented = tuple(re.findall(r"`([^`]+)`", cells[2]))
        assert documented == labels, f"{name}: documented labels {documented}, not {labels}"


def test_docs_name_no_metric_that_does_not_exist(
    registered: dict[str, tuple[str, tuple[str, ...]]],
) -> None:
    for page in ("metrics.md", "operations.md"):
        for name in set(re.findall(r"\bpgguard_[a-z_]+", read(page))):
            if name in ("pgguard_approvals", "pgguard_approval_windows"):
                continue  # the approvals store's tables, not metrics
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in registered, f"docs/{page} names {name}, which is not a metric"


@pytest.mark.parametrize(
    "label,values",
    [
        ("result", metrics.CONNECTION_RESULTS),
        ("reason", metrics.AUTH_FAILURE_REASONS),
        ("class", metrics.STATEMENT_CLASSES),
        ("decision", metrics.STATEMENT_DECISIONS),
        ("direction", metrics.DIRECTIONS),
    ],
)
def test_every_bounded_label_value_is_documented(label: str, values: tuple[str, ...]) -> None:
    assert len(values) >= 2
    spans = code_spans(read("metrics.md"))
    assert label in spans
    missing = [v for v in values if v not in spans]
    assert not missing, f"docs/metrics.md does not list {label} values {missing}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_every_readiness_check_is_documented() -> None:
    gateway = SimpleNamespace(
        server=None,
        draining=True,
        policy_error="broken",
        audit=None,
        settings=SimpleNamespace(upstream=SimpleNamespace(host="127.0.0.1", port=_closed_port())),
    )
    readiness = Readiness(cast(Any, gateway), connect_timeout=0.5)
    failed, checks = asyncio.run(readiness.check())
    assert len(checks) >= 5 and set(failed) <= set(checks)
    text = read("metrics.md")
    rows = {first_span(cells[0]) for cells in table_rows(text, "Check")}
    missing = [name for name in checks if name not in rows]
    assert not missing, f"docs/metrics.md has no /readyz row for {missing}"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert path in code_spans(text)


# --------------------------------------------------------------------------- policy


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    model = _model_of(annotation)
    if model is not None:
        yield model
        return
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            yield from _models_in(arg)


def policy_keys(model: type[BaseModel] = PolicyDocument) -> set[str]:
    """Every key a policy file can hold, walked through the nested models (a mask's
    ``function`` is written as a string such as ``keep_last(4)``: its parsed form is not a
    mapping of the file)."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        for inner in _models_in(info.annotation):
            if inner is not MaskFunction:
                keys |= policy_keys(inner)
    return keys


def test_every_policy_key_is_documented() -> None:
    keys = policy_keys()
    for expected in ("version", "approvers", "without_where", "exempt", "on_max_rows", "agents"):
        assert expected in keys
    assert len(keys) >= 20, sorted(keys)
    spans = code_spans(read("policy.md"))
    missing = sorted(k for k in keys if k not in spans)
    assert not missing, f"docs/policy.md does not mention policy keys {missing}"


def test_every_mask_function_is_documented() -> None:
    implemented = set(mask_functions._BUILDERS) | {"nullify"}
    assert set(MASK_FUNCTIONS) == implemented
    assert len(MASK_FUNCTIONS) >= 12
    spans = code_spans(read("policy.md"))
    rows = {first_span(cells[0]) or "" for cells in table_rows(read("policy.md"), "Function")}
    for name in MASK_FUNCTIONS:
        assert any(r == name or r.startswith(name + "(") for r in rows), (
            f"docs/policy.md has no row in the mask function table for {name}"
        )
    for word in (*PSEUDO_KINDS, *GENERALIZE_UNITS):
        assert word in spans, f"docs/policy.md does not mention {word!r}"


def test_every_statement_class_and_action_is_documented() -> None:
    assert len(STATEMENT_CLASSES) == 9
    text = read("policy.md")
    rows = {first_span(cells[0]) for cells in table_rows(text, "Class")}
    missing = [c for c in STATEMENT_CLASSES if c not in rows]
    assert not missing, f"docs/policy.md's class table lacks {missing}"
    spans = code_spans(text)
    for literal in (Action, DefaultAction, OnMaxRows):
        values = get_args(literal)
        assert values
        assert all(v in spans for v in values), values


def test_every_built_in_rule_is_documented() -> None:
    from pgguard.proxy.server import AUDIT_UNAVAILABLE

    names = {
        DEFAULT_RULE,
        identity_guard.RULE,
        identity_guard.SAFETY_RULE,
        identity_guard.LIMITS_RULE,
        mask_plan.RULE,
        AUDIT_UNAVAILABLE.rule,
        "parser",  # pgguard.policy.guard: a statement pglast cannot parse
    }
    assert len(names) == 7
    rows = {first_span(cells[0]) for cells in table_rows(read("policy.md"), "Rule")}
    missing = sorted(n for n in names if n not in rows)
    assert not missing, f"docs/policy.md's built-in rule table lacks {missing}"


# --------------------------------------------------------------------------- the CLI


def cli_commands(group: click.Group = cli_main, prefix: str = "pgguard") -> Iterator[str]:
    """``pgguard a b`` for every visible leaf command."""
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            yield from cli_commands(command, path)
        else:
            yield path


def test_every_cli_command_is_documented() -> None:
    commands = set(cli_commands())
    for expected in (
        "pgguard serve",
        "pgguard demo",
        "pgguard token mint",
        "pgguard policy explain",
        "pgguard audit verify",
        "pgguard sessions show",
        "pgguard approvals revoke",
    ):
        assert expected in commands
    assert len(commands) >= 15, sorted(commands)
    text = read("operations.md") + (ROOT / "README.md").read_text(encoding="utf-8")
    missing = sorted(c for c in commands if not re.search(re.escape(c) + r"\b", text))
    assert not missing, f"neither docs/operations.md nor README.md mentions {missing}"


# --------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", REFERENCES)
def test_links_between_the_references_resolve(page: str) -> None:
    text = read(page)
    links = re.findall(r"\]\(([a-z]+\.md)(?:#([\w-]+))?\)", text)
    for target, anchor in links:
        assert (DOCS / target).exists(), f"{page} links to missing docs/{target}"
        if anchor:
            assert anchor in anchors(read(target)), f"{page} links to {target}#{anchor}"
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in anchors(text), f"{page} links to #{anchor}, not a heading"
