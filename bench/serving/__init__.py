"""Serving benchmark (`pdserve bench`): datasets, arrival processes, an OpenAI-HTTP client and the
report (vLLM `bench serve` field names, goodput under SLOs)."""
