"""`pdserve ray up`: the cluster as Ray actors, one per component, placed by placement groups and
restarted by Ray (deploy/ray/launcher.py); its YAML config is deploy/ray/config.py."""
