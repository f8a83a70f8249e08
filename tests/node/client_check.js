// node-postgres client check, run by tests/integration/test_node.py.
// Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
// Prints one JSON document with what the client saw.
'use strict';

const { Client } = require('pg');

async function main() {
  const client = new Client({ application_name: 'node-check', statement_timeout: 30000 });
  const out = {};
  await client.connect();
  try {
    // Parameterized query (extended protocol, unnamed statement).
    let r = await client.query('SELECT $1::int + $2::int AS sum, $3::text AS t, $4::numeric AS n',
      [40, 2, 'ünïcødé ✓', '12.50']);
    out.param = { rows: r.rows, fields: r.fields.map((f) => [f.name, f.dataTypeID]) };

    // Rows from the reference table.
    r = await client.query('SELECT id, name, price, created, data, blob FROM items WHERE id <= $1 ORDER BY id', [3]);
    out.items = r.rows.map((row) => ({
      id: row.id, name: row.name, price: row.price, created: row.created.toISOString(),
      data: row.data, blob: row.blob === null ? null : row.blob.toString('hex'),
    }));

    // Named prepared statement, executed twice.
    const named = { name: 'item-by-id', text: 'SELECT name FROM items WHERE id = $1' };
    out.named = [];
    for (const id of [5, 25]) {
      r = await client.query({ ...named, values: [id] });
      out.named.push(r.rows[0].name);
    }

    // Simple protocol, multi-statement string.
    const multi = await client.query("SELECT 1 AS a; SELECT 'two' AS b; SELECT count(*)::int AS c FROM items");
    out.multi = multi.map((res) => [res.command, res.rows]);

    // A transaction rolled back, then one committed.
    await client.query('CREATE TEMP TABLE node_tx (id int PRIMARY KEY)');
    await client.query('BEGIN');
    await client.query('INSERT INTO node_tx VALUES ($1), ($2)', [1, 2]);
    const inTx = (await client.query('SELECT count(*)::int AS c FROM node_tx')).rows[0].c;
    await client.query('ROLLBACK');
    await client.query('BEGIN');
    await client.query('INSERT INTO node_tx VALUES ($1)', [3]);
    await client.query('COMMIT');
    const after = (await client.query('SELECT array_agg(id ORDER BY id) AS ids FROM node_tx')).rows[0].ids;
    out.tx = { in_tx: inTx, after };

    // A PostgreSQL error, then the session goes on.
    try {
      await client.query('SELECT 1 / $1::int', [0]);
      out.error = null;
    } catch (err) {
      out.error = { code: err.code, message: err.message, severity: err.severity };
    }
    // An error inside a transaction block.
    await client.query('BEGIN');
    try {
      await client.query('SELECT * FROM no_such_table_node');
    } catch (err) {
      out.error_in_tx = err.code;
    }
    try {
      await client.query('SELECT 1');
    } catch (err) {
      out.error_after = err.code;
    }
    await client.query('ROLLBACK');
    out.alive = (await client.query('SELECT $1::text AS s', ['alive'])).rows[0].s;

    // LISTEN/NOTIFY on the same session.
    const note = new Promise((resolve) => client.once('notification', (m) => resolve(m)));
    await client.query('LISTEN node_channel');
    await client.query("NOTIFY node_channel, 'from node'");
    let timer;
    const timeout = new Promise((resolve) => { timer = setTimeout(() => resolve(null), 5000); });
    const msg = await Promise.race([note, timeout]);
    clearTimeout(timer);
    out.notification = msg === null ? null : { channel: msg.channel, payload: msg.payload };
  } finally {
    await client.end();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`client_check failed: ${err.stack || err}\n`);
  process.exit(1);
});
