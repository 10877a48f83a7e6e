"""Programs trainrig copies onto nodes (they run there with the node's python3, stdlib only)."""
