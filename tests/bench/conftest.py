from tests.cluster.conftest import cluster  # noqa: F401  (a real local cluster for the serving benchmark)
