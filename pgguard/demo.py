"""``pgguard demo``: an embedded PostgreSQL, a demo schema, pgguard in front, tokens to try."""

from __future__ import annotations

import json
import secrets
import socket
import tempfile
from pathlib import Path

import click
import yaml

from pgguard.config import load_settings
from pgguard.embedded import EmbeddedPostgres, free_port
from pgguard.identity import mint_token
from pgguard.logs import setup_logging

DEMO_SCHEMA = """
CREATE ROLE pgguard LOGIN SUPERUSER PASSWORD '{password}';
CREATE DATABASE demo OWNER pgguard;
\\connect demo
CREATE SCHEMA vault;
CREATE TABLE public.customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    ssn text,
    salary numeric(10,2),
    city text,
    created timestamptz DEFAULT now()
);
CREATE TABLE public.orders (
    id serial PRIMARY KEY,
    customer_id int REFERENCES public.customers(id),
    status text NOT NULL DEFAULT 'open',
    total numeric(10,2) NOT NULL
);
CREATE TABLE vault.api_keys (id serial PRIMARY KEY, service text, secret text);
INSERT INTO public.customers (name, email, ssn, salary, city) VALUES
    ('Ada Lovelace', 'ada@example.com', '123-45-6789', 98000, 'London'),
    ('Alan Turing', 'alan@example.com', '987-65-4321', 87000, 'Manchester'),
    ('Grace Hopper', 'grace@example.com', '555-12-3456', 123000, 'Arlington'),
    ('Edsger Dijkstra', 'edsger@example.com', '222-33-4444', 91000, 'Austin');
INSERT INTO public.orders (customer_id, status, total) VALUES
    (1, 'open', 120.50), (2, 'shipped', 75.00), (3, 'open', 310.00), (4, 'void', 12.00);
INSERT INTO vault.api_keys (service, secret) VALUES ('payments', 'sk_live_not_a_real_key');
ALTER DATABASE demo OWNER TO pgguard;
ALTER TABLE public.customers OWNER TO pgguard;
ALTER TABLE public.orders OWNER TO pgguard;
"""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(port: int = 6432, keep_running: bool = True) -> int:
    from pgguard.app import serve_async
    from pgguard.proxy.server import run_coroutine

    setup_logging("info", "text")
    workdir = Path(tempfile.mkdtemp(prefix="pgguard-demo-"))
    workdir.chmod(0o755)  # the server may run as the postgres user
    upstream_password = secrets.token_urlsafe(16)
    jwt_secret = secrets.token_urlsafe(32)
    click.echo("Starting an embedded PostgreSQL …")
    pg = EmbeddedPostgres(base_dir=workdir / "pg")
    try:
        pg.start()
        pg.psql(DEMO_SCHEMA.format(password=upstream_password))
        if port == 0 or not _port_free(port):
            port = free_port()
        admin_port = 9187 if _port_free(9187) else free_port()
        # Secrets in files of the demo's directory (0600), so that the printed CLI commands
        # (pgguard approvals …, audit …) work from any shell with --config.
        secrets_dir = workdir / "secrets"
        secrets_dir.mkdir(mode=0o700)
        for name, value in (
            ("upstream-password", upstream_password),
            ("jwt-secret", jwt_secret),
            ("masking-secret", secrets.token_urlsafe(32)),
        ):
            path = secrets_dir / name
            path.write_text(value)
            path.chmod(0o600)
        policies = Path(__file__).resolve().parent.parent / "policies" / "demo.yaml"
        config = {
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "upstream": {
                "host": pg.host,
                "port": pg.port,
                "user": "pgguard",
                "password_env": None,
                "password_file": str(secrets_dir / "upstream-password"),
                "sslmode": "disable",
            },
            "identity": {
                "secret_env": None,
                "secret_file": str(secrets_dir / "jwt-secret"),
                "max_ttl": "8h",
            },
            "masking": {"secret_env": None, "secret_file": str(secrets_dir / "masking-secret")},
            "policies": [str(policies)] if policies.exists() else [],
            "audit": {"url": f"sqlite:///{workdir / 'audit.db'}"},
            "limits": {"drain_timeout": "5s"},
        }
        config_path = workdir / "pgguard.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        settings = load_settings(config_path, require_file=True)

        agent_token = mint_token(
            jwt_secret,
            "cursor-agent",
            groups=["ai-agents"],
            ttl=8 * 3600,
            claims={"agent": "cursor", "email": "agent@example.com"},
        )
        dba_token = mint_token(
            jwt_secret, "dana", groups=["dba"], ttl=8 * 3600, claims={"email": "dana@example.com"}
        )
        dev_token = mint_token(
            jwt_secret, "devon", groups=["developers"], ttl=8 * 3600,
            claims={"email": "devon@example.com"},
        )  # fmt: skip

        def ready(_gateway: object) -> None:
            dsn = f"postgresql://{{user}}@127.0.0.1:{port}/demo?sslmode=disable"
            mcp = {
                "mcpServers": {
                    "postgres-via-pgguard": {
                        "command": "npx",
                        "args": [
                            "-y",
                            "@modelcontextprotocol/server-postgres",
                            f"postgresql://cursor-agent:{agent_token}@127.0.0.1:{port}/demo",
                        ],
                    }
                }
            }
            click.echo("")
            click.echo(click.style("pgguard demo is running.", bold=True))
            click.echo(f"  gateway:   127.0.0.1:{port}  →  PostgreSQL 127.0.0.1:{pg.port}")
            click.echo(f"  config:    {config_path}")
            click.echo("")
            click.echo("Connect as the AI agent (groups: ai-agents):")
            click.echo(f"  PGPASSWORD='{agent_token}' psql '{dsn.format(user='cursor-agent')}'")
            click.echo("Connect as the DBA (groups: dba):")
            click.echo(f"  PGPASSWORD='{dba_token}' psql '{dsn.format(user='dana')}'")
            click.echo("Connect as a developer (groups: developers):")
            click.echo(f"  PGPASSWORD='{dev_token}' psql '{dsn.format(user='devon')}'")
            click.echo("")
            click.echo("Cursor mcp.json:")
            click.echo(json.dumps(mcp, indent=2))
            click.echo("")
            admin = f"http://127.0.0.1:{admin_port}"
            click.echo(f"Metrics:          {admin}/metrics")
            click.echo(f"Approvals page:   {admin}/approvals  (paste the DBA token to sign in)")
            click.echo("")
            click.echo("Three things to try:")
            click.echo("  1. As the agent, a masked select:")
            click.echo("       SELECT name, email, ssn, salary FROM customers;")
            click.echo("     (as the DBA, the same select shows clear values)")
            click.echo("  2. As the agent, a refused write:  DELETE FROM customers WHERE id = 1;")
            click.echo("  3. As the developer, a held statement:")
            click.echo("       UPDATE orders SET status = 'void' WHERE id = 1;")
            click.echo("     it waits for a DBA: approve it on the approvals page, or with")
            click.echo(
                f"       PGGUARD_TOKEN='{dba_token}' "
                f"pgguard approvals approve <id> --config {config_path}"
            )
            click.echo("Audit trail:  pgguard audit tail --config " + str(config_path))
            click.echo("Press Ctrl-C to stop; everything is removed on exit.")

        if keep_running:
            from pgguard.app import load_startup_policy

            policy = load_startup_policy(settings)
            if policy is False:
                return 2
            run_coroutine(lambda: serve_async(settings, policy=policy, on_ready=ready))
        else:
            ready(None)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        pg.stop(mode="immediate")
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
        click.echo("pgguard demo stopped and cleaned up.")
