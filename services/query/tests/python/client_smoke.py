"""Drives the query API through the client generated from the committed spec.

Usage: client_smoke.py BASE_URL EXPECTED_TOTAL API_KEY [CA_FILE]
(the generated package on PYTHONPATH; CA_FILE: the CA to trust for an https BASE_URL)
"""
import ssl
import sys

from etl_platform_query_api_client import AuthenticatedClient
from etl_platform_query_api_client.api.data import get_record, list_data
from etl_platform_query_api_client.api.stats import get_stats
from etl_platform_query_api_client.models import DataPage, DataRecord, Problem, Sort, Stats

base_url, expected, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
# Only this CA is trusted: the certificate is checked, host name included.
verify = ssl.create_default_context(cafile=sys.argv[4]) if len(sys.argv) > 4 else True
client = AuthenticatedClient(
    base_url=base_url, token=key, raise_on_unexpected_status=True, verify_ssl=verify
)

# The spec declares the API key, so the client sends it; a wrong one is a typed 401 problem.
wrong = AuthenticatedClient(base_url=base_url, token="etlq_wrong", verify_ssl=verify)
refused = list_data.sync_detailed(client=wrong)
assert refused.status_code == 401 and isinstance(refused.parsed, Problem), refused
assert refused.parsed.code == "unauthorized", refused.parsed

seen, page = [], 1
while True:
    result = list_data.sync(client=client, page=page, page_size=7)
    assert isinstance(result, DataPage), result
    assert result.total == expected and result.total_exact, result
    seen += [record.source_id for record in result.data]
    if not result.has_more:
        break
    page += 1
assert len(seen) == expected == len(set(seen)), seen

# The same walk by cursor: the generated client passes next_cursor back as cursor.
walked, cursor, pages = [], None, 0
while True:
    if cursor is None:
        result = list_data.sync(client=client, page_size=7)
    else:
        result = list_data.sync(client=client, page_size=7, cursor=cursor)
    assert isinstance(result, DataPage), result
    pages += 1
    assert result.page == pages, (result.page, pages)
    walked += [record.source_id for record in result.data]
    if not result.has_more:
        assert not isinstance(result.next_cursor, str), result.next_cursor
        break
    cursor = result.next_cursor
    assert isinstance(cursor, str), result
assert walked == seen, (walked, seen)

stats = get_stats.sync(client=client)
assert isinstance(stats, Stats), stats
assert stats.total_records == expected, stats

record = get_record.sync("gen", "12", client=client)
assert isinstance(record, DataRecord) and record.name == "item 12", record
absent = get_record.sync_detailed("gen", "24", client=client)
assert absent.status_code == 404 and isinstance(absent.parsed, Problem), absent
assert absent.parsed.code == "not_found", absent.parsed
largest = list_data.sync(client=client, sort=Sort.VALUE_DESCENDING, max_value=3)
assert isinstance(largest, DataPage) and [r.value for r in largest.data] == [3, 2, 1], largest

bad = list_data.sync_detailed(client=client, page_size=101)
assert bad.status_code == 400 and isinstance(bad.parsed, Problem), bad
assert bad.parsed.code == "invalid_parameter" and bad.parsed.parameter == "page_size", bad.parsed

print(f"paged {len(seen)} records over {page} pages, by cursor over {pages}; stats total {stats.total_records}")
