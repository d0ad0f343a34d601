"""Archive, restore and audit rows share one failure rule: a reason from the job's closed set, or a bug."""

from __future__ import annotations

import pytest

from pipeline.audit import AUDIT_REASONS, AuditRecord
from pipeline.restore import RESTORE_REASONS, RestoreRecord
from pipeline.types import REASONS, STATUS_FAILED, STATUS_OK, Record


@pytest.mark.parametrize("make,reasons", [
    (lambda: Record("k", "s", 0, "u", "fp", status=STATUS_OK, bitstream=b"x", bitstream_crc32=1, bpp=0.1), REASONS),
    (lambda: RestoreRecord("k", 0, status=STATUS_OK), RESTORE_REASONS),
    (lambda: AuditRecord("k", "s", 0, status=STATUS_OK), AUDIT_REASONS),
])
def test_fail_sets_reason_and_refuses_unknown_ones(make, reasons) -> None:
    reason = sorted(reasons)[0]
    rec = make().fail(reason, "why")
    assert (rec.status, rec.reason, rec.error) == (STATUS_FAILED, reason, "why")
    with pytest.raises(ValueError, match="unknown .*reason 'made_up'"):
        make().fail("made_up", "x")


def test_a_failed_archive_row_keeps_no_bitstream() -> None:
    rec = Record("k", "s", 0, "u", "fp", status=STATUS_OK, bitstream=b"x", bitstream_crc32=1, bpp=0.1)
    rec.fail(sorted(REASONS)[0], "why")
    assert rec.bitstream is None and rec.bitstream_crc32 is None and rec.bpp is None
