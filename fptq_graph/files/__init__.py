"""What a run writes to disk, as transactions: outputs declared and checked up front, staged beside their
targets, committed together by rename, and removed on failure or a stop signal (run_outputs)."""
