// Drives the query API through the TypeScript client that @hey-api/openapi-ts generated from
// the committed spec (`cargo xtask test` generates it, type-checks this file against it and
// compiles both).
//
// Usage: node client_smoke.js BASE_URL EXPECTED_TOTAL API_KEY

import { createClient } from './client/client';
import { getRecord, getStats, listData, type DataRecord, type Problem } from './client';

// Node's own global, declared here so the check needs no @types/node.
declare const process: { argv: string[]; exitCode: number | undefined };

function check(condition: boolean, what: string, detail: unknown): asserts condition {
  if (!condition) {
    throw new Error(`${what}: ${JSON.stringify(detail)}`);
  }
}

async function main(): Promise<string> {
  const [baseUrl, expectedText, key] = process.argv.slice(2);
  const expected = Number(expectedText);
  // The spec declares the API key: the client sends `auth` where the spec asks for it.
  const client = createClient({ baseUrl, auth: key });
  const wrong = await listData({ client: createClient({ baseUrl, auth: 'etlq_wrong' }) });
  check(
    wrong.response.status === 401 && wrong.error?.code === 'unauthorized',
    'a wrong key',
    wrong.error,
  );

  const seen: DataRecord[] = [];
  let page = 1;
  for (;;) {
    const { data, error } = await listData({ client, query: { page, page_size: 7 } });
    check(data !== undefined, `page ${page}`, error);
    check(data.total === expected && data.total_exact, 'total', data);
    seen.push(...data.data);
    if (!data.has_more) break;
    page += 1;
  }
  const ids = seen.map((record) => record.source_id);
  check(ids.length === expected && new Set(ids).size === expected, 'records paged', ids);

  // The same walk by cursor: next_cursor goes back as cursor.
  const walked: string[] = [];
  let cursor: string | undefined;
  let pages = 0;
  do {
    const { data, error } = await listData({ client, query: { page_size: 7, cursor } });
    check(data !== undefined, `cursor ${cursor}`, error);
    pages += 1;
    check(data.page === pages, 'page of the walk', data);
    walked.push(...data.data.map((record) => record.source_id));
    cursor = data.next_cursor;
    check((cursor === undefined) === !data.has_more, 'next_cursor iff has_more', data);
  } while (cursor !== undefined);
  check(JSON.stringify(walked) === JSON.stringify(ids), 'cursor walk', walked);

  const stats = await getStats({ client });
  check(stats.data?.total_records === expected, 'stats', stats.error);

  const record = await getRecord({ client, path: { source: 'gen', source_id: '12' } });
  check(record.data?.name === 'item 12', 'one record', record.error);
  const absent = await getRecord({ client, path: { source: 'gen', source_id: '24' } });
  check(absent.response.status === 404 && absent.error?.code === 'not_found', 'absent record', absent.error);
  const largest = await listData({ client, query: { sort: '-value', max_value: 3 } });
  const values = largest.data?.data.map((r) => r.value);
  check(JSON.stringify(values) === '[3,2,1]', 'sort and range', values);

  const bad = await listData({ client, query: { page_size: 101 } });
  const problem: Problem | undefined = bad.error;
  check(bad.response.status === 400, 'status of a bad request', bad.response.status);
  check(
    problem?.code === 'invalid_parameter' && problem.parameter === 'page_size',
    'typed problem',
    problem,
  );
  return (
    `paged ${ids.length} records over ${page} pages, by cursor over ${pages}; ` +
    `stats total ${stats.data.total_records}; problem ${problem.code} names ${problem.parameter}`
  );
}

main().then(
  (line) => console.log(line),
  (error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  },
);
