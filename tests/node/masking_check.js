// node-postgres side of tests/integration/test_masking.py (the masking leak corpus).
// Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE.
// argv[2] is a JSON file: [{name, steps: [sql, ...], simple: bool}, ...]. Every step runs on
// one session, in order; a step runs as a named prepared statement (extended protocol)
// unless the case is `simple` (multi-statement strings, simple query protocol).
// Every value is kept exactly as PostgreSQL sent it (text format, no type parsing), so that
// the test sees what the client received. Prints one JSON document:
// {case name: {steps: [{sql, sets: [{columns, oids, rows}], error}], notices: [...]}}.
'use strict';

const fs = require('fs');
const { Client } = require('pg');

const FIELDS = ['severity', 'code', 'message', 'detail', 'hint', 'position', 'internalPosition',
  'internalQuery', 'where', 'schema', 'table', 'column', 'dataType', 'constraint', 'file',
  'line', 'routine'];

function fields(err) {
  const out = {};
  for (const k of FIELDS) {
    if (err[k] !== undefined && err[k] !== null) out[k] = String(err[k]);
  }
  if (Object.keys(out).length === 0) out.client = String(err.stack || err);
  return out;
}

async function main() {
  const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const raw = (value) => value;
  const client = new Client({
    application_name: 'node-masking',
    statement_timeout: 30000,
    types: { getTypeParser: () => raw },
  });
  let notices = [];
  client.on('notice', (msg) => notices.push(fields(msg)));
  await client.connect();
  const out = {};
  let counter = 0;
  try {
    for (const c of cases) {
      notices = [];
      const steps = [];
      for (const sql of c.steps) {
        const step = { sql, sets: [], error: null };
        try {
          const query = c.simple
            ? { text: sql, rowMode: 'array' }
            : { text: sql, name: `mask_stmt_${counter++}`, rowMode: 'array' };
          const res = await client.query(query);
          for (const r of Array.isArray(res) ? res : [res]) {
            if (r.fields && r.fields.length > 0) {
              step.sets.push({
                columns: r.fields.map((f) => f.name),
                oids: r.fields.map((f) => f.dataTypeID),
                rows: r.rows,
              });
            }
          }
        } catch (err) {
          step.error = fields(err);
        }
        steps.push(step);
      }
      out[c.name] = { steps, notices };
    }
  } finally {
    await client.end();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`masking_check failed: ${err.stack || err}\n`);
  process.exit(1);
});
