"""Running pdserve: the `pdserve` command line, and (with the cluster and operations work) the local
multi-process launcher, the Ray launcher, the Helm chart, Grafana dashboards and Prometheus rules.
It contains no serving logic."""
