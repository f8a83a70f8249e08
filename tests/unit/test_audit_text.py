"""Audit text helpers: prompt-id comments, secret/literal redaction, params, statement split."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser

from pgguard.audit.text import (
    PROMPT_ID_MAX_LEN,
    SECRET_TRIGGERS,
    encode_params,
    fingerprint,
    nested_too_deep,
    prompt_id_from_comment,
    prompt_setting,
    redact_literals,
    redact_secrets,
    scrub_error,
    statement_texts,
)

# ---------------------------------------------------------------------------------------
# prompt_id_from_comment


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select 1 /* prompt_id='abc' */", "abc"),
        ("/* prompt_id='abc' */ select 1", "abc"),
        ("select /* prompt_id='abc' */ 1", "abc"),
        ("/*prompt_id='a%20b',agent='cursor'*/ select 1", "a b"),
        ("select 1 /*agent='cursor',prompt_id='p%2F1%27x'*/", "p/1'x"),
        ("select 1 /* pgguard_prompt_id='xyz' */", "xyz"),
        ("select 1 /* PROMPT_ID='Upper' */", "Upper"),
        ("select 1 -- prompt_id='line'\n", "line"),
        ("select 1 -- prompt_id='line'", "line"),
        ("select 1\n-- agent='x', pgguard_prompt_id='l2'\nfrom t", "l2"),
        ("select 1 /* prompt_id='a+b' */", "a+b"),  # sqlcommenter: + is not a space
        ("select 1 /* prompt_id='it\\'s' */", "it's"),  # sqlcommenter's \' escape
        ("select 1 /* prompt_id=bare */", "bare"),
        ("select 1 /* prompt_id = 'spaced' */", "spaced"),
        ("select 1 /* outer /* prompt_id='nested' */ still */", "nested"),
        ("select 'é' /* prompt_id='ünï' */", "ünï"),
    ],
)
def test_prompt_id_found(sql: str, expected: str) -> None:
    assert prompt_id_from_comment(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "select 1",
        "select 'prompt_id=''x'''",
        "select '/* prompt_id=''x'' */'",
        "select e'/* prompt_id=\\'x\\' */'",
        "select $$ /* prompt_id='x' */ $$",
        "select $tag$ -- prompt_id='x'\n $tag$",
        "select \"/* prompt_id='x' */\" from t",
        "select 1 /* xprompt_id='a' */",
        "select 1 /* prompt_idx='a' */",
        "select 1 /* prompt_id='' */",
        "select 1 /* some other comment */",
        "select 'abc /* prompt_id='x' */",  # unterminated literal: no comment in it
    ],
)
def test_prompt_id_not_outside_comments(sql: str) -> None:
    assert prompt_id_from_comment(sql) is None


def test_prompt_id_first_comment_wins() -> None:
    sql = "/* prompt_id='first' */ select 1 /* prompt_id='second' */ -- prompt_id='third'"
    assert prompt_id_from_comment(sql) == "first"


def test_prompt_id_skips_literal_then_takes_comment() -> None:
    sql = "select '/* prompt_id=''fake'' */', $$ -- prompt_id='fake2' $$ /* prompt_id='real' */"
    assert prompt_id_from_comment(sql) == "real"


def test_prompt_id_empty_value_does_not_count() -> None:
    assert prompt_id_from_comment("select 1 /* prompt_id='' */ -- prompt_id='b'") == "b"


def test_prompt_id_first_key_in_comment() -> None:
    sql = "select 1 /* pgguard_prompt_id='one',prompt_id='two' */"
    assert prompt_id_from_comment(sql) == "one"


def test_prompt_id_control_chars_stripped_and_capped() -> None:
    assert prompt_id_from_comment("select 1 /* prompt_id='a%0Ab%1B\u202ec' */") == "abc"
    long_value = "x" * 1000
    found = prompt_id_from_comment(f"select 1 /* prompt_id='{long_value}' */")
    assert found == "x" * PROMPT_ID_MAX_LEN


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_prompt_id_never_raises(sql: str) -> None:
    found = prompt_id_from_comment(sql)
    assert found is None or (0 < len(found) <= PROMPT_ID_MAX_LEN)


# ---------------------------------------------------------------------------------------
# redact_secrets


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "CREATE ROLE app LOGIN PASSWORD 's3cr''et' VALID UNTIL 'infinity'",
            "CREATE ROLE app LOGIN PASSWORD '***' VALID UNTIL 'infinity'",
        ),
        (
            "create user u with encrypted password 'x'",
            "create user u with encrypted password '***'",
        ),
        ("alter role r password 'x'", "alter role r password '***'"),
        ("ALTER USER \"Bob\" WITH PASSWORD 'pw'", "ALTER USER \"Bob\" WITH PASSWORD '***'"),
        ("create group g password 'x'", "create group g password '***'"),
        ("alter group g with password 'x'", "alter group g with password '***'"),
        ("alter role r password null", "alter role r password null"),
        (
            "alter role r password $pw$secret$pw$",
            "alter role r password '***'",
        ),
        (
            "create user mapping for bob server s options (user 'bob', password 'pw')",
            "create user mapping for bob server s options (user 'bob', password '***')",
        ),
        (
            "alter user mapping for bob server s options (set password 'x', add \"user\" 'b',"
            " drop token)",
            "alter user mapping for bob server s options (set password '***', add \"user\" 'b',"
            " drop token)",
        ),
        (
            "CREATE USER MAPPING FOR public SERVER s OPTIONS (passwd 'a', secret 'b', "
            "token 'c', \"password\" 'd', client_secret 'e', user 'f')",
            "CREATE USER MAPPING FOR public SERVER s OPTIONS (passwd '***', secret '***', "
            "token '***', \"password\" '***', client_secret '***', user 'f')",
        ),
        (
            "create server s foreign data wrapper w options (host 'h', password 'z')",
            "create server s foreign data wrapper w options (host 'h', password '***')",
        ),
        (
            "alter server s options (set secret 'z', dsn 'host=h password=p')",
            "alter server s options (set secret '***', dsn 'host=h password=***')",
        ),
        (
            "select * from dblink('host=h password=p user=u', 'select 1') as t(a int)",
            "select * from dblink('host=h password=*** user=u', 'select 1') as t(a int)",
        ),
        (
            "select dblink_connect('c1', 'dbname=x password = ''p q'' user=u')",
            "select dblink_connect('c1', 'dbname=x password = *** user=u')",
        ),
        (
            "select dblink_connect('postgresql://u:pw@h:5432/db?sslmode=require&password=x')",
            "select dblink_connect('postgresql://u:***@h:5432/db?sslmode=require&password=***')",
        ),
        (
            "select dblink_exec('host=h password=p', 'insert into t values (1)')",
            "select dblink_exec('host=h password=***', 'insert into t values (1)')",
        ),
        (
            "select dblink_open('host=h password=p', 'cur', 'select 1')",
            "select dblink_open('host=h password=***', 'cur', 'select 1')",
        ),
        (
            "select public.dblink_connect_u(E'host=h password=p')",
            "select public.dblink_connect_u(E'host=h password=***')",
        ),
        (
            "select dblink_connect(E'host=h\\tpassword=p')",  # escapes: whole literal
            "select dblink_connect('***')",
        ),
        (
            "select dblink_connect($$host=h password=p$$)",
            "select dblink_connect($$host=h password=***$$)",
        ),
        (
            "select dblink_exec('c', 'alter role x password ''y''')",
            "select dblink_exec('c', 'alter role x password ''***''')",
        ),
        (
            "create subscription s connection 'host=h password=p' publication p",
            "create subscription s connection 'host=h password=***' publication p",
        ),
        (
            "alter subscription s connection 'host=h sslpassword=k password=p'",
            "alter subscription s connection 'host=h sslpassword=*** password=***'",
        ),
    ],
)
def test_redact_secrets(sql: str, expected: str) -> None:
    assert redact_secrets(sql) == expected


def test_redact_secrets_multibyte_offsets() -> None:
    sql = "select 'ünïcödé'; alter role \"é\" password 'pässwörd'; select 'ß', 'password'"
    assert redact_secrets(sql) == (
        "select 'ünïcödé'; alter role \"é\" password '***'; select 'ß', 'password'"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "select 'password', password from users where password = 'hunter2'",
        "insert into notes values ('host=a password=b')",  # user data, not a conninfo
        "update users set password = 'x'",  # a column named password: user data
        "select 1 /* password 'x' */",
        "select secret, token from t",
        "comment on role r is 'password policy'",
        "select dblink_connect('myconn')",
    ],
)
def test_redact_secrets_leaves_other_statements(sql: str) -> None:
    assert redact_secrets(sql) == sql


def test_redact_secrets_unparseable_statement_is_conservative() -> None:
    assert redact_secrets("create role r password 'x' oops") == "create role r password '***' oops"
    # One broken statement does not cost the others their exact treatment.
    sql = "alter role a password 'b'; selec 1; select 'password=1'"
    assert redact_secrets(sql) == "alter role a password '***'; selec 1; select 'password=1'"


def test_redact_secrets_unterminated_literal() -> None:
    assert redact_secrets("create role r password 'abc") == "create role r password '***'"


def test_redact_secrets_only_changes_the_secret() -> None:
    sql = "CREATE   ROLE  x\n\tWITH /* note */ LOGIN\n PASSWORD   'pw'  -- trailing\n"
    redacted = redact_secrets(sql)
    assert redacted == sql.replace("'pw'", "'***'")


_FRAGMENTS = [
    "select",
    "create role r",
    "alter user u",
    "with",
    "login",
    "valid until",
    "'x'",
    "'it''s'",
    "$$body$$",
    "$t$ a $t$",
    "e'\\n'",
    '"quoted"',
    "/* c */",
    "-- c\n",
    ";",
    ",",
    "(",
    ")",
    "1",
    "from t",
    "where a =",
    "options",
    "user",
    "server s",
    "é",
    "'host=h'",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_redact_secrets_never_raises(sql: str) -> None:
    redacted = redact_secrets(sql)
    assert isinstance(redacted, str)
    if not any(word in sql.lower() for word in SECRET_TRIGGERS):
        assert redacted == sql


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=20))
def test_redact_secrets_unchanged_without_secret_words(parts: list[str]) -> None:
    sql = " ".join(parts)
    assert redact_secrets(sql) == sql


_SECRET_FRAGMENTS = [
    *_FRAGMENTS,
    "password",
    "encrypted password",
    "dblink(",
    "dblink_exec('c',",
    "mapping",
    "secret",
    "token",
    "'host=h password=p'",
    "'postgresql://u:p@h'",
    "E'p\\'q'",
    "'",
    "$$",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_SECRET_FRAGMENTS), max_size=20))
def test_redact_secrets_fragments_never_raise(parts: list[str]) -> None:
    sql = " ".join(parts)
    redacted = redact_secrets(sql)
    # Only string literals change, and only to something containing ***.
    if redacted != sql:
        assert "***" in redacted
        before, after = _non_string_tokens(sql), _non_string_tokens(redacted)
        if before is not None:
            assert before == after


def _non_string_tokens(sql: str) -> list[tuple[str, str]] | None:
    try:
        tokens = parser.scan(sql)
    except parser.ParseError:
        return None
    return [
        (tok.name, sql[tok.start : tok.end + 1])
        for tok in tokens
        if tok.name not in ("SCONST", "USCONST")
    ]


# ---------------------------------------------------------------------------------------
# redact_literals


def test_redact_literals() -> None:
    sql = (
        "select 'a', 1, -1.5e3, $$x$$, e'\\n', b'01', x'ff', u&'d' "
        "from t where a = $1 and b is true /* prompt_id='p' */"
    )
    assert redact_literals(sql) == (
        "select ?, ?, -?, ?, ?, ?, ?, ? from t where a = $1 and b is true /* prompt_id='p' */"
    )


def test_redact_literals_keeps_identifiers() -> None:
    sql = 'select "col1", t2.c3 from "t 4" where x = 5'
    assert redact_literals(sql) == 'select "col1", t2.c3 from "t 4" where x = ?'


def test_redact_literals_unterminated_and_unparseable() -> None:
    assert redact_literals("selec 'x' + 1") == "selec ? + ?"
    assert redact_literals("select 'unterminated") == "select ?"


# ---------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_groups_by_shape() -> None:
    first = fingerprint("select * from t where a = 1")
    assert first is not None
    assert first == fingerprint("SELECT * FROM t WHERE a = 42")
    assert first != fingerprint("select * from u where a = 1")
    assert fingerprint("selec 1") is None


# ---------------------------------------------------------------------------------------
# encode_params


def test_encode_params_text_binary_null() -> None:
    assert encode_params([b"abc", None, b"\x00\xff"], [0, 0, 1]) == (
        "abc",
        None,
        "base64:" + base64.b64encode(b"\x00\xff").decode(),
    )


def test_encode_params_format_codes() -> None:
    assert encode_params([b"a", b"b"], []) == ("a", "b")
    assert encode_params([b"a", b"b"], [1]) == ("base64:YQ==", "base64:Yg==")
    # not UTF-8 (a LATIN1 client's): byte for byte, as the statement's text is read
    assert encode_params([b"caf\xe9"], [0]) == ("café",)
    assert encode_params([b"\xe9" * 20], [0], cap=10) == ("é" * 10 + "…(20 bytes)",)


def test_encode_params_cap() -> None:
    big = b"x" * 3000
    (text,) = encode_params([big], [0], cap=10)
    assert text == "x" * 10 + "…(3000 bytes)"
    (binary,) = encode_params([big], [1], cap=10)
    assert binary == "base64:" + base64.b64encode(b"x" * 10).decode() + "…(3000 bytes)"
    exact = encode_params([b"y" * 10], [0], cap=10)
    assert exact == ("y" * 10,)


def test_encode_params_cap_cuts_on_character_boundary() -> None:
    (text,) = encode_params(["é".encode() * 10], [0], cap=5)
    assert text == "éé…(20 bytes)"


def test_encode_params_redacted() -> None:
    assert encode_params([b"secret", None, b"\x01"], [0, 0, 1], redact_params=True) == (
        "***",
        None,
        "***",
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=8),
    st.lists(st.sampled_from([0, 1]), max_size=8),
    st.integers(min_value=0, max_value=100),
)
def test_encode_params_properties(values: list[bytes | None], formats: list[int], cap: int) -> None:
    encoded = encode_params(values, formats, cap=cap)
    assert len(encoded) == len(values)
    for value, out in zip(values, encoded, strict=True):
        if value is None:
            assert out is None
            continue
        assert out is not None
        if len(value) > cap:
            assert out.endswith(f"…({len(value)} bytes)")
        if out.startswith("base64:") and len(value) <= cap:
            assert base64.b64decode(out[7:]) == value


# ---------------------------------------------------------------------------------------
# statement_texts


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("select 1", ["select 1"]),
        ("select 1;", ["select 1"]),
        ("  select 1 ;  ", ["select 1"]),
        ("", []),
        ("  ", []),
        (";;", []),
        ("-- only a comment", []),
        ("select 1; select 2", ["select 1", "select 2"]),
        ("select 1;; select 2;", ["select 1", "select 2"]),
        ("select ';'; select 'é;'", ["select ';'", "select 'é;'"]),
        ('select $$a;b$$; select "x;y"', ["select $$a;b$$", 'select "x;y"']),
        (
            "/* prompt_id='a' */ select 1; -- prompt_id='b'\nselect 2 /* c */;",
            ["/* prompt_id='a' */ select 1", "-- prompt_id='b'\nselect 2 /* c */"],
        ),
        ("select 1; -- tail comment", ["select 1; -- tail comment"]),
        ("selec 1; select 2", ["selec 1", "select 2"]),  # does not parse: scanner split
        (
            "create function f() returns int begin atomic select 1; "
            "select case when true then 2 end; end; select 3",
            [
                "create function f() returns int begin atomic select 1; "
                "select case when true then 2 end; end",
                "select 3",
            ],
        ),
        (
            "create function f() returns int begin atomic select 1; end; selec 3",
            ["create function f() returns int begin atomic select 1; end", "selec 3"],
        ),
        ("select 'unterminated; select 2", ["select 'unterminated; select 2"]),
    ],
)
def test_statement_texts(sql: str, expected: list[str]) -> None:
    assert statement_texts(sql) == expected


def test_statement_texts_then_prompt_ids() -> None:
    texts = statement_texts("select 1 /* prompt_id='a' */; select 2; /* prompt_id='c' */ select 3")
    assert [prompt_id_from_comment(text) for text in texts] == ["a", None, "c"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_statement_texts_never_raises(sql: str) -> None:
    for text in statement_texts(sql):
        assert text and text == text.strip()
        assert text in sql


def test_redact_secrets_every_string_after_a_secret_word_in_broken_text() -> None:
    # Which of the strings the user meant as the password cannot be told: all go.
    assert (
        redact_secrets("CREATE ROLE r1 PASSWORD 'leak1' 'leak2'")
        == "CREATE ROLE r1 PASSWORD '***' '***'"
    )


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("CREATE ROLE r3 PASSWORD 'leak4", 'unterminated quoted string at or near "\'leak4"'),
        ("CREATE ROLE r1 PASSWORD 'leak1' 'leak2'", "syntax error at or near \"'leak2'\""),
        ("ALTER ROLE r PASSWORD 'hunter22' VALID UNTIL 'x'", 'invalid value "hunter22x"'),
    ],
)
def test_errors_lose_what_the_statement_lost(statement: str, message: str) -> None:
    scrubbed = scrub_error(message, statement, redact_secrets(statement))
    for secret in ("leak1", "leak2", "leak4", "hunter22"):
        assert secret not in scrubbed
    assert "***" in scrubbed


def test_errors_of_statements_without_secrets_are_kept() -> None:
    message = 'syntax error at or near "selec"'
    assert scrub_error(message, "selec 1", "selec 1") is message


@pytest.mark.parametrize(
    ("sql", "effect"),
    [
        ("SET pgguard.prompt_id = 'p-1'", ("set", "p-1", False)),
        ("set pgguard.prompt_id to 'it''s'", ("set", "it's", False)),
        ("/* note */ SET pgguard.prompt_id='x'", ("set", "x", False)),
        ('SET "pgguard".prompt_id = unquoted_p', ("set", "unquoted_p", False)),
        ("SET SESSION pgguard.prompt_id = 42", ("set", "42", False)),
        ("SET LOCAL pgguard.prompt_id = 'l'", ("set", "l", True)),
        ("SET pgguard.prompt_id = ''", ("set", None, False)),
        ("select set_config('pgguard.prompt_id', 'cfg', false)", ("set", "cfg", False)),
        ("SELECT pg_catalog.set_config('PGGUARD.PROMPT_ID', 'c', true)", ("set", "c", True)),
        ("SET pgguard.prompt_id TO DEFAULT", ("reset", None, False)),
        ("RESET pgguard.prompt_id", ("reset", None, False)),
        ("RESET ALL", ("reset", None, False)),
        ("DISCARD ALL", ("reset", None, False)),
        ("SET pgguard.prompt_id FROM CURRENT", ("unknown", None, False)),
        ("select set_config('pgguard.prompt_id', md5('x'), false)", ("unknown", None, False)),
        ("select set_config(name, 'x', false) from settings", ("unknown", None, False)),
        ("select set_config('app.tenant', 'x', false)", None),
        ("RESET search_path", None),
        ("DISCARD PLANS", None),
        ("select 'prompt_id'", None),
    ],
)
def test_prompt_setting(sql: str, effect: tuple[str, str | None, bool] | None) -> None:
    assert prompt_setting(sql) == effect


def test_text_with_comments_nested_too_deep_is_never_scanned() -> None:
    deep = "/* prompt_id='p' */ " + "/*" * 35_000 + "*/" * 35_000 + " select 1; select 2"
    assert nested_too_deep(deep)
    assert not nested_too_deep("/*" * 100 + "*/" * 100)
    assert not nested_too_deep("/* a */ " * 500)  # many comments, none nested
    assert statement_texts(deep) == [deep.strip()]
    assert fingerprint(deep) is None
    assert prompt_id_from_comment(deep) is None
    assert prompt_setting("set pgguard.prompt_id = 'x' " + "/*" * 200) == ("unknown", None, False)
