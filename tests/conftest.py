"""Suite-wide settings, applied before any test starts a process (children inherit the environment)."""
import os

# Each engine and router would otherwise build its structured-output compiler at start (~1 s of CPU on the
# 2-core CI machine, ~2.5 s per cluster start): the suite starts dozens of clusters that never see a
# constrained request. The clusters that serve constrained requests turn it back on (env of `Cluster`), and
# test_structured_output_sampling checks both paths in process.
os.environ.setdefault("PDSERVE_GRAMMAR_PREWARM", "0")
