// run-bench peer: graphile-worker draining N no-op jobs.
//
//   node graphile.mjs --url URL --jobs N --concurrency W [--batched]
//
// Installs graphile-worker's schema, adds N jobs of a no-op task in one `add_jobs` call (not
// timed), then times a runner with `concurrency: W` from its start until it has run all N,
// the jobs table is empty (every completion committed) and the runner has stopped. Prints
// one JSON line on stdout. Any failure: a message on stderr and exit code 1.
//
// `--batched` uses the settings of graphile-worker's own perfTest/graphile.config.js:
// `localQueue: { size: 500, refetchDelay: { durationMs: 10 } }`, `completeJobBatchDelay: 0`,
// `failJobBatchDelay: 0`. Without it, graphile-worker's defaults (no local queue, one
// `get_job` and one `complete_job` statement per job). Both use `maxPoolSize: W + 1`, as the
// perf test does (the default pool of 10 starves 16 workers, and graphile-worker warns).
//
// Run from the folder whose node_modules holds graphile-worker (run-bench writes it there).

import { createRequire } from "node:module";
import { parseArgs } from "node:util";

const require = createRequire(import.meta.url);
const worker = require("graphile-worker");
const { Pool } = require("pg");
const { version } = require("graphile-worker/package.json");

const TASK = "run_bench_noop";

// Once every job has run: how often to look for the last completions, and for how long.
const SETTLE_POLL_MS = 2;
const SETTLE_TIMEOUT_MS = 60_000;

async function jobsLeft(pool) {
  const { rows } = await pool.query("select count(*)::int as n from graphile_worker._private_jobs");
  return rows[0].n;
}

function fail(message) {
  process.stderr.write(`graphile.mjs: ${message}\n`);
  process.exit(1);
}

function positive(name, text) {
  const n = Number(text);
  if (!Number.isInteger(n) || n < 1) fail(`--${name} must be a positive integer, not ${text}`);
  return n;
}

async function main() {
  const { values } = parseArgs({
    options: {
      url: { type: "string" },
      jobs: { type: "string" },
      concurrency: { type: "string" },
      batched: { type: "boolean", default: false },
    },
    strict: true,
  });
  if (!values.url) fail("--url is required");
  const jobs = positive("jobs", values.jobs ?? "");
  const concurrency = positive("concurrency", values.concurrency ?? "");
  const batched = values.batched;

  // Quiet: warnings and errors to stderr, nothing on stdout.
  const logger = new worker.Logger(() => (level, message) => {
    if (level === "error" || level === "warning") {
      process.stderr.write(`graphile-worker ${level}: ${message}\n`);
    }
  });

  await worker.runMigrations({ connectionString: values.url, logger });

  const pool = new Pool({ connectionString: values.url, max: 1 });
  try {
    const added = await pool.query(
      `select count(*)::int as n from graphile_worker.add_jobs(array(
         select row($1, '{}'::json, null, null, null, null, null, null)::graphile_worker.job_spec
         from generate_series(1, $2::int)
       ))`,
      [TASK, jobs],
    );
    if (added.rows[0].n !== jobs) fail(`added ${added.rows[0].n} jobs, not ${jobs}`);

    let done = 0;
    let allDone;
    const finished = new Promise((resolve) => {
      allDone = resolve;
    });
    const taskList = {
      [TASK]: async () => {
        done += 1;
        if (done === jobs) allDone();
      },
    };

    const preset = batched
      ? {
          worker: {
            localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
            completeJobBatchDelay: 0,
            failJobBatchDelay: 0,
          },
        }
      : { worker: {} };

    const started = process.hrtime.bigint();
    const runner = await worker.run({
      connectionString: values.url,
      concurrency,
      maxPoolSize: concurrency + 1,
      noHandleSignals: true,
      logger,
      taskList,
      crontab: "",
      preset,
    });
    // A runner that dies (lost connection, ...) ends the wait with its error.
    let stopping = false;
    await Promise.race([
      finished,
      runner.promise.then(() => {
        if (!stopping) fail("the runner stopped before all jobs ran");
      }),
    ]);
    // The last jobs have run but may not be completed yet: without batching, graphile-worker
    // does not await `complete_job`, and its graceful shutdown does not wait for it either
    // (stopping at once can leave a job locked in the table). So the drain ends when the
    // table is empty; then the runner is stopped (which flushes batched completions, if any).
    const deadline = Date.now() + SETTLE_TIMEOUT_MS;
    let left = await jobsLeft(pool);
    while (left !== 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, SETTLE_POLL_MS));
      left = await jobsLeft(pool);
    }
    stopping = true;
    await runner.stop();
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;

    left = await jobsLeft(pool);
    if (left !== 0) fail(`${left} jobs left in the table after all ${jobs} ran`);
    if (done !== jobs) fail(`ran ${done} jobs, not ${jobs}`);

    process.stdout.write(
      JSON.stringify({
        peer: "graphile-worker",
        version,
        batched,
        jobs,
        concurrency,
        seconds,
        jobs_per_s: jobs / seconds,
      }) + "\n",
    );
  } finally {
    await pool.end();
  }
}

main().catch((e) => fail(e?.message ?? String(e)));
