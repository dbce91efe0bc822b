"""Expert parallelism inside a node: the ranks' process group, the token all-to-all (dispatch /
combine) behind one interface, and the runtime that binds MoE layers to the live expert map and
applies EPLB rebalances between steps. Placement logic itself lives in `engine/eplb/`."""
