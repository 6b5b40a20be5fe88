"""The reference's self-generated parquet schema (spec §5.2), spelled out independently of d2l_fast's writer, and a
writer of rows in it — shared by the data-reader and trainer tests. Import after ``pytest.importorskip("pyarrow")``."""

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema(
    [
        ("ctx_ids", pa.list_(pa.int32())),
        ("input_ids", pa.list_(pa.list_(pa.int32()))),
        ("response_start_end", pa.list_(pa.list_(pa.int64()))),
        ("logprobs_vals", pa.list_(pa.list_(pa.list_(pa.float16())))),
        ("logprobs_indices", pa.list_(pa.list_(pa.list_(pa.int32())))),
    ]
)


def write_rows(path, rows, schema=SCHEMA, row_group_size=2):
    """Write dict ``rows`` (keys: the schema's column names) to ``path``; returns ``path``."""
    cols = {f.name: [r[f.name] for r in rows] for f in schema}
    pq.write_table(pa.table(cols, schema=schema), path, row_group_size=row_group_size)
    return path
