"""Config files: TOML/YAML documents, merge configs (mergekit field names) and daemon configs."""
